"""The paper's ResNet-like single-stream model (after MDEQ's single-stream structure).

    x  = stem(image)                       conv3x3(3 -> C), GroupNorm, relu      (not tied)
    z0 = 0
    z_{i+1} = f(z_i, x),  i = 0..K-1       one residual block with input injection (tied)
    logits = Dense(GAP(z_K))               pooled linear head                     (not tied)

    f(z, x) = GN(relu(z + GN(x + conv2(GN(relu(conv1(z)))))))

3x3 convolutions without bias, GroupNorm (no batch statistics inside the scan). Forms:
``not_tied`` (K independent blocks) and ``tied`` with mask modes dense / same / multi / dropout.

Parameter counts (3 input channels, 10 classes): the tied block has ``18*C^2 + 6*C`` (two
bias-free 3x3 convs and three GroupNorms), the stem ``27*C + 2*C`` and the head ``10*C + 10``:
``18C^2 + 45C + 10`` for the tied form, ``K*(18C^2 + 6C) + 39C + 10`` not tied. The paper gives no
widths; ``size='small'`` (C=44: 36,838) and ``size='large'`` (C=172: 540,262) are the multiples of
the 4 GroupNorm groups nearest its Table 1b counts for the weight-tied ResNet (35k and 0.53M).
``width=`` (default 64, the width of the performance notes) is used when ``size`` is None.
``dtype`` is the compute dtype (mixed precision policy: :mod:`wtjax.core.precision`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from wtjax.core import precision
from wtjax.core.conv import Conv
from wtjax.models.tying import TiedModel, run_tie

SIZES = {"small": 44, "large": 172}


class ResidualInjectionBlock(nn.Module):
    """``f(z, x) = GN(relu(z + GN(x + conv2(GN(relu(conv1(z)))))))``: the tied block of the model.

    It is the shared inner block of the weight-tied model and of the DEQ (same parameter space).
    ``dtype``: compute dtype of the convolutions and norm outputs (``None``: promotion).
    """

    width: int
    groups: int = 4
    conv_impl: str = "auto"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, z, x):
        group_norm = precision.norm_class(nn.GroupNorm, self.dtype)
        norm = lambda name: group_norm(num_groups=self.groups, dtype=self.dtype, name=name)  # noqa: E731
        h = Conv(self.width, impl=self.conv_impl, dtype=self.dtype, name="conv1")(z)
        h = norm("gn1")(nn.relu(h))
        h = Conv(self.width, impl=self.conv_impl, dtype=self.dtype, name="conv2")(h)
        h = norm("gn2")(x + h)
        return norm("gn3")(nn.relu(z + h))


class ResNetLike(TiedModel):
    """Single-stream ResNet-like classifier; returns ``(logits, out)``.

    Attributes:
      num_classes: classifier outputs.
      width: channels C of the stem and the tied block (when ``size`` is None).
      size: ``None``, ``'small'`` (C=44) or ``'large'`` (C=172), overriding ``width``.
      depth: reuses K of the block.
      groups: GroupNorm groups.
      conv_impl: convolution implementation (:mod:`wtjax.core.conv`).
      (tie fields ``form``, ``mask_mode``, ``mask``, ``scan``, ``remat_policy``,
      ``checkpoint_every``, ``dtype``: :class:`~wtjax.models.tying.TiedModel`; the not-tied form
      is always dense: it is the paper's explicit baseline.)
    """

    num_classes: int = 10
    width: int = 64
    size: str | None = None
    depth: int = 8
    groups: int = 4
    conv_impl: str = "auto"

    @nn.compact
    def __call__(
        self, images, *, train: bool = False, depth: int | None = None, return_intermediates: bool = False
    ):
        """Classify ``images`` (NHWC).

        Returns:
          ``(logits, out)``; ``out`` has ``stem``, ``pre_logits`` and, when
          ``return_intermediates``, ``block_outputs`` (the state after each reuse, axis 0).
        """
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose one of {sorted(SIZES)} or set width")
        width = SIZES[self.size] if self.size else self.width
        dtype = precision.layer_dtype(self.dtype)
        x = Conv(width, impl=self.conv_impl, dtype=dtype, name="stem_conv")(precision.cast(images, dtype))
        x = nn.relu(
            precision.norm_class(nn.GroupNorm, dtype)(num_groups=self.groups, dtype=dtype, name="stem_gn")(x)
        )
        tied = self.tie(
            ResidualInjectionBlock(width, self.groups, self.conv_impl, dtype), depth=self.depth, name="tied"
        )
        z, zs = run_tie(
            tied, jnp.zeros_like(x), x, train=train, depth=depth, return_intermediates=return_intermediates
        )
        pooled = jnp.mean(z, axis=(1, 2))
        logits = precision.upcast(nn.Dense(self.num_classes, dtype=dtype, name="head")(pooled))
        out = {"stem": x, "pre_logits": pooled}
        if return_intermediates:
            out["block_outputs"] = zs
        return logits, out
