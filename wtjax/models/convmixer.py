"""Isotropic ConvMixer (Trockman & Kolter 2022) with not-tied, tied and SPIN-shared layer stacks.

    x = norm(gelu(conv_{P x P, stride P}(image)))                 patch embedding   (not tied)
    z = z + norm(gelu(depthwise_{K x K}(z)))                       \\  one layer,
    z = norm(gelu(pointwise_{1 x 1}(z)))                           /  depth times    (Tied)
    logits = Dense(GAP(z))

Normalisation: the original uses BatchNorm; batch statistics cannot live inside the tie
(google/flax#2052), so each ``norm`` is a per-position LayerNorm over channels (the same ``2C``
parameters as BatchNorm). SPIN (apple/ml-spin) shares only the pointwise conv (``share_params=
'pointwise'``, the default); ``'all'`` shares the whole layer.

Parameter count, ``C`` channels, ``D`` layers, ``P`` patch, ``K`` kernel, ``n`` classes::

    stem  3 P^2 C + C + 2C        layer  (K^2 C + C) + 2C + (C^2 + C) + 2C        head  C n + n

ConvMixer-768/32/14/3 on ImageNet: 20.47M (SPIN Table 1: 20.46M); with the pointwise conv shared
at rate 2: 11.02M (SPIN: 11.02M).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from wtjax.core import precision
from wtjax.models.tying import SpinModel, run_tie

#: ``C/D/P/K`` sizes: SPIN's ImageNet models (Tables 4-5) and small CIFAR ones.
VARIANTS = {
    "1536/20/7/3": dict(width=1536, depth=20, patch_size=7, kernel_size=3),
    "768/32/14/3": dict(width=768, depth=32, patch_size=14, kernel_size=3),
    "512/16/14/9": dict(width=512, depth=16, patch_size=14, kernel_size=9),
    # CIFAR: ConvMixer-256/8 (Trockman & Kolter's CIFAR-10 size) with patch 2 and kernel 5.
    "256/8/2/5": dict(width=256, depth=8, patch_size=2, kernel_size=5),
    "128/8/2/5": dict(width=128, depth=8, patch_size=2, kernel_size=5),
    "tiny": dict(width=8, depth=4, patch_size=2, kernel_size=3),
}
#: ``share_params`` names and the block parameters they share (``None``: all of them).
SHARE_PREDICATES = {"pointwise": lambda path, leaf: path[0] == "pointwise", "all": None}
SHARE_PARAMS = tuple(SHARE_PREDICATES)


def parameter_count(
    width: int, depth: int, patch_size: int, kernel_size: int, num_classes: int, share_rate: int = 1
) -> int:
    """The formula in the module docstring (pointwise conv shared at ``share_rate``, uniform)."""
    c = width
    stem = 3 * patch_size**2 * c + c + 2 * c
    pointwise = c * c + c
    rest = kernel_size**2 * c + c + 4 * c
    return stem + depth * rest + (depth // share_rate) * pointwise + c * num_classes + num_classes


class ConvMixerLayer(nn.Module):
    """One ConvMixer layer ``z -> norm(gelu(pw(z + norm(gelu(dw(z))))))`` (the reused block).

    ``dtype``: compute dtype of the convolutions and norm outputs (``None``: promotion).
    """

    width: int
    kernel_size: int = 9
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, z):
        k = (self.kernel_size, self.kernel_size)
        dw = nn.Conv(
            self.width, k, padding="SAME", feature_group_count=self.width, dtype=self.dtype, name="depthwise"
        )
        z = z + nn.LayerNorm(dtype=self.dtype, name="norm1")(nn.gelu(dw(z)))
        z = nn.Conv(self.width, (1, 1), dtype=self.dtype, name="pointwise")(z)
        return nn.LayerNorm(dtype=self.dtype, name="norm2")(nn.gelu(z))


class ConvMixer(SpinModel):
    """ConvMixer classifier returning ``(logits, out)`` (model contract in :mod:`wtjax.models`).

    Attributes:
      num_classes, width, depth, patch_size, kernel_size: the ``C/D/P/K`` architecture.
      (tie and SPIN fields: :class:`~wtjax.models.tying.SpinModel`; ``form`` defaults to
      ``shared``, ``mask_mode`` to ``dense``; ``share_params`` is ``pointwise`` (SPIN) or ``all``.)
    """

    form: str = "shared"
    mask_mode: str = "dense"
    share_params: str = "pointwise"
    TIE_NAME = "mixer"
    SHARE_PREDICATES = SHARE_PREDICATES

    num_classes: int = 10
    width: int = 256
    depth: int = 8
    patch_size: int = 2
    kernel_size: int = 5

    @nn.compact
    def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
        """Classify NHWC ``images``; ``out`` has ``pre_logits`` (and ``block_outputs``)."""
        p = (self.patch_size, self.patch_size)
        dtype = precision.layer_dtype(self.dtype)
        x = nn.Conv(self.width, p, strides=p, padding="VALID", dtype=dtype, name="stem")(
            precision.cast(images, dtype)
        )
        x = nn.LayerNorm(dtype=dtype, name="stem_norm")(nn.gelu(x))
        tied = self.tie(
            ConvMixerLayer(self.width, self.kernel_size, dtype), depth=self.depth, name=self.TIE_NAME
        )
        z, zs = run_tie(tied, x, train=train, return_intermediates=return_intermediates)
        pooled = jnp.mean(z, axis=(1, 2))
        logits = precision.upcast(nn.Dense(self.num_classes, dtype=dtype, name="head")(pooled))
        out = {"pre_logits": pooled}
        if return_intermediates:
            out["block_outputs"] = zs
        return logits, out
