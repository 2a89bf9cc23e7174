"""Isotropic ViT whose encoder stack goes through :class:`wtjax.core.tied.Tied` (not-tied, tied, SPIN-shared).

The layer is :class:`wtjax.models.vit.EncoderBlock` (the public-checkpoint block), reused as is:
``patch embedding + position embedding -> depth x EncoderBlock -> LayerNorm -> pool -> head``.
Unlike :class:`wtjax.models.vit.ViT` its block parameters live under ``encoder/block/block/...``
(stacked on a leading axis when not tied or shared), so public checkpoints need restacking.

Sizes: :data:`wtjax.models.vit.VARIANTS` via ``vit_fields('S/16')`` etc. (SPIN applies sharing to
ImageNet ViTs in its Appendix B) and small CIFAR ones such as ``'S/4'`` on 32x32 images.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from wtjax.core import precision
from wtjax.core.masks import MaskSpec
from wtjax.core.spin import options as spin
from wtjax.core.tied import Tied
from wtjax.models.vit import AddPositionEmbs, EncoderBlock

SHARE_PARAMS = ("all", "attention", "mlp")


class EncoderLayer(nn.Module):
    """:class:`wtjax.models.vit.EncoderBlock` with ``deterministic`` bound: Tied's ``block(z) -> z``."""

    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    deterministic: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        block = EncoderBlock(
            self.mlp_dim,
            self.num_heads,
            self.dropout_rate,
            self.attention_dropout_rate,
            self.dtype,
            name="block",
        )
        return block(x, deterministic=self.deterministic)


def _share_predicate(name: str):
    if name not in SHARE_PARAMS:
        raise ValueError(f"unknown share_params {name!r}; choose one of {SHARE_PARAMS}")
    if name == "all":
        return None
    prefixes = (
        ("LayerNorm_0", "MultiHeadDotProductAttention_1")
        if name == "attention"
        else ("LayerNorm_2", "MlpBlock_3")
    )
    return lambda path, leaf: path[1] in prefixes


class SharedViT(nn.Module):
    """ViT classifier with a not-tied / tied / SPIN-shared encoder; returns ``(logits, out)``.

    Attributes:
      num_classes, patch_size, width, depth, mlp_dim, num_heads: ViT sizes.
      classifier: ``gap`` (mean of tokens) or ``token`` (a cls token).
      dropout_rate, attention_dropout_rate: dropout rates.
      form, share_*, affine_groups, fusion: sharing (:mod:`wtjax.core.spin.options`); ``share_params``
        in ``all``/``attention``/``mlp``.
      mask_mode, mask: masks on the reused kernels.
      scan, remat_policy: loop implementation.
      dtype: compute dtype, ``'float32'`` or ``'bfloat16'`` (:mod:`wtjax.core.precision`); parameters
        and logits stay float32.
    """

    num_classes: int = 10
    patch_size: int = 4
    width: int = 192
    depth: int = 12
    mlp_dim: int = 768
    num_heads: int = 3
    classifier: str = "gap"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    form: str = "shared"
    share_rate: int = 2
    share_mapping: str = "sequential"
    share_distribution: str = "uniform"
    share_seed: int = 0
    share_params: str = "all"
    affine_groups: int = 0
    fusion: str = "none"
    mask_mode: str = "dense"
    mask: MaskSpec = MaskSpec(density=0.9)
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
        if self.classifier not in ("token", "gap"):
            raise ValueError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
        p = self.patch_size
        dtype = precision.layer_dtype(self.dtype)
        embed = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=dtype, name="embedding")
        x = embed(precision.cast(images, dtype))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.classifier == "token":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
            x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (x.shape[0], 1, 1)), x], axis=1)
        x = AddPositionEmbs(name="posembed_input")(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        layer = EncoderLayer(
            self.mlp_dim,
            self.num_heads,
            self.dropout_rate,
            self.attention_dropout_rate,
            deterministic=not train,
            dtype=dtype,
        )
        tied = Tied(
            layer,
            depth=self.depth,
            mask_mode=self.mask_mode if self.form != "not_tied" else "dense",
            mask=self.mask,
            scan=self.scan,
            remat_policy=self.remat_policy,
            checkpoint_every=self.checkpoint_every,
            dtype=self.dtype,
            name="encoder",
            **spin.tie_kwargs(self, self.share_predicate),
        )
        result = tied(x, deterministic=not train, return_intermediates=return_intermediates)
        x, xs = result if return_intermediates else (result, None)
        x = nn.LayerNorm(dtype=dtype, name="encoder_norm")(x)
        pooled = x[:, 0] if self.classifier == "token" else x.mean(axis=1)
        logits = precision.upcast(nn.Dense(self.num_classes, dtype=dtype, name="head")(pooled))
        out = {"pre_logits": pooled}
        if return_intermediates:
            out["block_outputs"] = xs
        return logits, out

    def from_not_tied(self, fused_init: dict, not_tied: dict) -> dict:
        """SPIN fusion init from a trained not-tied model (:func:`wtjax.core.spin.options.from_not_tied`)."""
        return spin.from_not_tied(fused_init, not_tied, "encoder")

    def export_fused(self, params: dict):
        """``(model, params)`` with the fusion folded away (:func:`wtjax.core.spin.options.export_fused`)."""
        return spin.export_fused(self, params, "encoder", self.share_predicate)
