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
from wtjax.models.tying import SpinModel, run_tie
from wtjax.models.vit import AddPositionEmbs, EncoderBlock, embed_patches

_ATTENTION_LAYERS = ("LayerNorm_0", "MultiHeadDotProductAttention_1")
_MLP_LAYERS = ("LayerNorm_2", "MlpBlock_3")
#: ``share_params`` names and the block parameters they share (``None``: all of them).
SHARE_PREDICATES = {
    "all": None,
    "attention": lambda path, leaf: path[1] in _ATTENTION_LAYERS,
    "mlp": lambda path, leaf: path[1] in _MLP_LAYERS,
}
SHARE_PARAMS = tuple(SHARE_PREDICATES)


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


class SharedViT(SpinModel):
    """ViT classifier with a not-tied / tied / SPIN-shared encoder; returns ``(logits, out)``.

    Attributes:
      num_classes, patch_size, width, depth, mlp_dim, num_heads: ViT sizes.
      classifier: ``gap`` (mean of tokens) or ``token`` (a cls token).
      dropout_rate, attention_dropout_rate: dropout rates.
      (tie and SPIN fields: :class:`~wtjax.models.tying.SpinModel`; ``form`` defaults to
      ``shared``, ``mask_mode`` to ``dense``; ``share_params`` in ``all``/``attention``/``mlp``.)
    """

    form: str = "shared"
    mask_mode: str = "dense"
    mask: MaskSpec = MaskSpec(density=0.9)
    SHARE_PREDICATES = SHARE_PREDICATES

    num_classes: int = 10
    patch_size: int = 4
    width: int = 192
    depth: int = 12
    mlp_dim: int = 768
    num_heads: int = 3
    classifier: str = "gap"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
        """Classify NHWC ``images``; ``out`` has ``pre_logits`` (and ``block_outputs``)."""
        dtype = precision.layer_dtype(self.dtype)
        x = AddPositionEmbs(name="posembed_input")(embed_patches(self, images, dtype))
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        layer = EncoderLayer(
            self.mlp_dim,
            self.num_heads,
            self.dropout_rate,
            self.attention_dropout_rate,
            deterministic=not train,
            dtype=dtype,
        )
        tied = self.tie(layer, depth=self.depth, name=self.TIE_NAME)
        x, xs = run_tie(tied, x, train=train, return_intermediates=return_intermediates)
        x = nn.LayerNorm(dtype=dtype, name="encoder_norm")(x)
        pooled = x[:, 0] if self.classifier == "token" else x.mean(axis=1)
        logits = precision.upcast(nn.Dense(self.num_classes, dtype=dtype, name="head")(pooled))
        out = {"pre_logits": pooled}
        if return_intermediates:
            out["block_outputs"] = xs
        return logits, out
