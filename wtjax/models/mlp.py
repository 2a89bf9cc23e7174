"""The paper's MLP (section 3.3): linear layers only, the shared part two weight-tied layers.

    x  = relu(LN(W_e flatten(image) + b_e))                  embedding            (not tied)
    z0 = 0
    z_{i+1} = f(z_i, x),  i = 0..K-1                          two Dense layers     (tied)
    logits = W_h z_K + b_h                                    head                 (not tied)

    f(z, x) = LN3(relu(z + LN2(x + W2 LN1(relu(W1 z + b1)) + b2)))

The tied block is the ResNet-like block (:mod:`wtjax.models.resnet_like`) with its two 3x3
convolutions replaced by Dense layers and GroupNorm by LayerNorm, including the input injection
``x``: so ``f(z, x) -> z`` is also a DEQ block (same parameter space for the weight-tied and the
implicit model). The paper gives no widths for its MLP; ``small`` is width 256 and ``large``
doubles it (512), as the paper's small/large do.

Parameter counts (``d`` = flattened input size, ``w`` = width, ``c`` = classes, ``K`` = depth):

* tied block: ``2*w^2 + 2*w`` (two Dense) ``+ 6*w`` (three LayerNorms) ``= 2*w^2 + 8*w``;
* embedding: ``d*w + w`` (Dense) ``+ 2*w`` (LayerNorm); head: ``c*w + c``;
* total: ``tied``: ``(2*w^2 + 8*w) + d*w + 3*w + c*w + c``; ``not_tied``: the block term times K.

For CIFAR-10 (``d = 3072``, ``c = 10``) with K=8: small 0.93M tied / 1.85M not tied; large 2.11M
tied / 5.81M not tied. Unlike the convolutional models the embedding dominates the tied
model (``d*w`` against ``2*w^2``) at these widths.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from wtjax.core import precision
from wtjax.models.tying import TiedModel, run_tie

MLP_SIZES = {"small": 256, "large": 512}


def resolve_width(size: str, width: int | None, sizes: dict[str, int], family: str) -> int:
    """The width of a model: ``width`` if given, else the preset of ``size``."""
    if width is not None:
        if width < 1:
            raise ValueError(f"{family} width must be >= 1, got {width}")
        return width
    if size not in sizes:
        raise ValueError(f"unknown {family} size {size!r}; choose one of {sorted(sizes)} or set width")
    return sizes[size]


class MLPBlock(nn.Module):
    """``f(z, x) = LN3(relu(z + LN2(x + W2 LN1(relu(W1 z + b1)) + b2)))``: the tied MLP block.

    Two Dense layers of ``width`` units (with bias) and an input injection ``x``; ``z`` and ``x``
    have shape ``(..., width)``. Shared by the weight-tied MLP and the MLP DEQ.

    Attributes:
      width: units of both Dense layers (the state size).
      dtype: compute dtype of the layers (``None``: promotion; :mod:`wtjax.core.precision`).
    """

    width: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, z, x):
        h = nn.Dense(self.width, dtype=self.dtype, name="dense1")(z)
        h = nn.LayerNorm(dtype=self.dtype, name="ln1")(nn.relu(h))
        h = nn.Dense(self.width, dtype=self.dtype, name="dense2")(h)
        h = nn.LayerNorm(dtype=self.dtype, name="ln2")(x + h)
        return nn.LayerNorm(dtype=self.dtype, name="ln3")(nn.relu(z + h))


class MLP(TiedModel):
    """Weight-tied (or not-tied) MLP classifier; returns ``(logits, out)``.

    Attributes:
      num_classes: classifier outputs.
      size: ``small`` (width 256) or ``large`` (512); ignored when ``width`` is set.
      width: hidden width (overrides ``size``).
      depth: reuses K of the tied block (layers of the not-tied stack).
      (tie fields ``form``, ``mask_mode``, ``mask``, ``scan``, ``remat_policy``,
      ``checkpoint_every``, ``dtype``: :class:`~wtjax.models.tying.TiedModel`; the mask applies to
      the two tied Dense kernels only.)
    """

    num_classes: int = 10
    size: str = "small"
    width: int | None = None
    depth: int = 8

    @nn.compact
    def __call__(
        self, images, *, train: bool = False, depth: int | None = None, return_intermediates: bool = False
    ):
        """Classify ``images`` (any shape ``(B, ...)``; flattened per example).

        Args:
          images: ``(B, H, W, C)`` (or any ``(B, ...)``) array.
          train: enables the ``dropout`` mask mode.
          depth: reuses to run now (tied form; default ``self.depth``).
          return_intermediates: also return the state after every reuse.

        Returns:
          ``(logits, out)``; ``out`` has ``embedding``, ``pre_logits`` and, when
          ``return_intermediates``, ``block_outputs`` of shape ``(K, B, width)``.
        """
        width = resolve_width(self.size, self.width, MLP_SIZES, "MLP")
        dtype = precision.layer_dtype(self.dtype)
        x = precision.cast(images.reshape(images.shape[0], -1), dtype)
        x = nn.Dense(width, dtype=dtype, name="embed")(x)
        x = nn.relu(nn.LayerNorm(dtype=dtype, name="embed_ln")(x))
        tied = self.tie(MLPBlock(width, dtype), depth=self.depth, name="tied")
        z, zs = run_tie(
            tied, jnp.zeros_like(x), x, train=train, depth=depth, return_intermediates=return_intermediates
        )
        logits = precision.upcast(nn.Dense(self.num_classes, dtype=dtype, name="head")(z))
        out = {"embedding": x, "pre_logits": z}
        if return_intermediates:
            out["block_outputs"] = zs
        return logits, out
