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
from wtjax.core.masks import MaskSpec
from wtjax.core.spin import options as spin
from wtjax.core.tied import Tied

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
SHARE_PARAMS = ("pointwise", "all")


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


def _share_predicate(name: str):
    if name not in SHARE_PARAMS:
        raise ValueError(f"unknown share_params {name!r}; choose one of {SHARE_PARAMS}")
    return None if name == "all" else (lambda path, leaf: path[0] == "pointwise")


class ConvMixer(nn.Module):
    """ConvMixer classifier returning ``(logits, out)`` (model contract in :mod:`wtjax.models`).

    Attributes:
      num_classes, width, depth, patch_size, kernel_size: the ``C/D/P/K`` architecture.
      form: ``not_tied``, ``tied`` or ``shared`` (:mod:`wtjax.core.spin.options`).
      share_rate, share_mapping, share_distribution, share_seed: SPIN topology (form ``shared``).
      share_params: ``pointwise`` (SPIN) or ``all``.
      affine_groups: SPIN per-layer affine transform group size (0: off).
      fusion: ``none`` or a SPIN fusion strategy.
      mask_mode, mask: masks on the reused weights (:class:`wtjax.core.tied.Tied`).
      scan, remat_policy: loop implementation.
      dtype: compute dtype, ``'float32'`` or ``'bfloat16'`` (:mod:`wtjax.core.precision`); parameters
        and logits stay float32.
    """

    num_classes: int = 10
    width: int = 256
    depth: int = 8
    patch_size: int = 2
    kernel_size: int = 5
    form: str = "shared"
    share_rate: int = 2
    share_mapping: str = "sequential"
    share_distribution: str = "uniform"
    share_seed: int = 0
    share_params: str = "pointwise"
    affine_groups: int = 0
    fusion: str = "none"
    mask_mode: str = "dense"
    mask: MaskSpec = MaskSpec()
    scan: bool = True
    remat_policy: str | None = None
    checkpoint_every: int | str | None = None  # Tied's depth-memory mode: None, an int or 'sqrt'
    dtype: str = "float32"

    @property
    def share_predicate(self):
        return _share_predicate(self.share_params)

    @nn.compact
    def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
        """Classify NHWC ``images``; ``out`` has ``pre_logits`` (and ``block_outputs``)."""
        p = (self.patch_size, self.patch_size)
        dtype = precision.layer_dtype(self.dtype)
        x = nn.Conv(self.width, p, strides=p, padding="VALID", dtype=dtype, name="stem")(
            precision.cast(images, dtype)
        )
        x = nn.LayerNorm(dtype=dtype, name="stem_norm")(nn.gelu(x))
        tied = Tied(
            ConvMixerLayer(self.width, self.kernel_size, dtype),
            depth=self.depth,
            mask_mode=self.mask_mode,
            mask=self.mask,
            scan=self.scan,
            remat_policy=self.remat_policy,
            checkpoint_every=self.checkpoint_every,
            dtype=self.dtype,
            name="mixer",
            **spin.tie_kwargs(self, self.share_predicate),
        )
        result = tied(x, deterministic=not train, return_intermediates=return_intermediates)
        z, zs = result if return_intermediates else (result, None)
        pooled = jnp.mean(z, axis=(1, 2))
        logits = precision.upcast(nn.Dense(self.num_classes, dtype=dtype, name="head")(pooled))
        out = {"pre_logits": pooled}
        if return_intermediates:
            out["block_outputs"] = zs
        return logits, out

    def from_not_tied(self, fused_init: dict, not_tied: dict) -> dict:
        """SPIN fusion init from a trained not-tied ConvMixer (see :mod:`wtjax.core.spin.options`)."""
        return spin.from_not_tied(fused_init, not_tied, "mixer")

    def export_fused(self, params: dict):
        """``(model, params)`` with the fusion folded away (:func:`wtjax.core.spin.options.export_fused`)."""
        return spin.export_fused(self, params, "mixer", self.share_predicate)
