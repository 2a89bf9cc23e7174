"""The paper's ResNet-like single-stream model (after MDEQ's single-stream structure).

    x  = stem(image)                       conv3x3(3 -> C), GroupNorm, relu      (not tied)
    z0 = 0
    z_{i+1} = f(z_i, x),  i = 0..K-1       one residual block with input injection (tied)
    logits = Dense(GAP(z_K))               pooled linear head                     (not tied)

    f(z, x) = GN(relu(z + GN(x + conv2(GN(relu(conv1(z)))))))

3x3 convolutions without bias, GroupNorm (no batch statistics inside the scan). Forms:
``not_tied`` (K independent blocks) and ``tied`` with mask modes dense / same / multi / dropout.

Parameter counts (10 classes, 4 groups): width C has ``2*9*C^2`` parameters in the tied block plus
``6*C`` GroupNorm parameters, a stem of ``27*C + 2*C`` and a head of ``10*C + 10``. The paper gives
no widths; ``small`` (C=40, 32k parameters) and ``large`` (C=168, 0.52M) are chosen to land near
its Table 1b counts for the weight-tied ResNet (35k and 0.53M).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from wtjax.conv import Conv
from wtjax.masks import MaskSpec
from wtjax.tied import Tied

FORMS = ("tied", "not_tied")


class ResidualInjectionBlock(nn.Module):
    """``f(z, x) = GN(relu(z + GN(x + conv2(GN(relu(conv1(z)))))))``: the tied block of the model.

    It is the shared inner block of the weight-tied model and of the DEQ (same parameter space).
    """

    width: int
    groups: int = 4
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, z, x):
        norm = lambda name: nn.GroupNorm(num_groups=self.groups, name=name)  # noqa: E731
        h = Conv(self.width, impl=self.conv_impl, name="conv1")(z)
        h = norm("gn1")(nn.relu(h))
        h = Conv(self.width, impl=self.conv_impl, name="conv2")(h)
        h = norm("gn2")(x + h)
        return norm("gn3")(nn.relu(z + h))


class ResNetLike(nn.Module):
    """Single-stream ResNet-like classifier; returns ``(logits, out)``.

    Attributes:
      num_classes: classifier outputs.
      width: channels C of the stem and the tied block.
      depth: reuses K of the block.
      form: ``tied`` or ``not_tied``.
      mask_mode: ``dense``, ``same``, ``multi`` or ``dropout`` (tied form; see :class:`Tied`).
      mask: mask kind, density, N:M and seed.
      groups: GroupNorm groups.
      scan: scan (default) or the unrolled reference loop.
      remat_policy: name in ``jax.checkpoint_policies`` or ``None``.
      conv_impl: convolution implementation (:mod:`wtjax.conv`).
    """

    num_classes: int = 10
    width: int = 64
    depth: int = 8
    form: str = "tied"
    mask_mode: str = "multi"
    mask: MaskSpec = MaskSpec()
    groups: int = 4
    scan: bool = True
    remat_policy: str | None = None
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, images, *, train: bool = False, depth: int | None = None, return_intermediates: bool = False):
        """Classify ``images`` (NHWC).

        Returns:
          ``(logits, out)``; ``out`` has ``stem``, ``pre_logits`` and, when
          ``return_intermediates``, ``block_outputs`` (the state after each reuse, axis 0).
        """
        if self.form not in FORMS:
            raise ValueError(f"unknown form {self.form!r}; choose one of {FORMS}")
        x = Conv(self.width, impl=self.conv_impl, name="stem_conv")(images)
        x = nn.relu(nn.GroupNorm(num_groups=self.groups, name="stem_gn")(x))
        tied = Tied(
            ResidualInjectionBlock(self.width, self.groups, self.conv_impl),
            depth=self.depth,
            mask_mode=self.mask_mode if self.form == "tied" else "dense",
            mask=self.mask,
            scan=self.scan,
            remat_policy=self.remat_policy,
            shared=self.form == "tied",
            name="tied",
        )
        result = tied(jnp.zeros_like(x), x, depth=depth, deterministic=not train, return_intermediates=return_intermediates)
        z, zs = result if return_intermediates else (result, None)
        pooled = jnp.mean(z, axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="head")(pooled)
        out = {"stem": x, "pre_logits": pooled}
        if return_intermediates:
            out["block_outputs"] = zs
        return logits, out
