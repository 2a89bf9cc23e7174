"""Vision Transformer whose parameter tree is the public ViT checkpoint layout.

The module names reproduce the ``.npz`` checkpoints published by google-research/
vision_transformer (ImageNet-21k and AugReg ones), so ``np.load`` + unflatten gives a tree that
``model.apply`` accepts without renaming::

    embedding/{kernel (P, P, 3, D), bias}
    cls (1, 1, D)                                      # classifier == 'token' only
    Transformer/posembed_input/pos_embedding (1, N(+1), D)   # includes the cls position
    Transformer/encoderblock_{i}/LayerNorm_0/{scale, bias}
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/kernel (D, H, D/H)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/bias (H, D/H)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out/kernel (H, D/H, D), bias (D,)
    Transformer/encoderblock_{i}/LayerNorm_2/{scale, bias}
    Transformer/encoderblock_{i}/MlpBlock_3/Dense_{0,1}/{kernel, bias}
    Transformer/encoder_norm/{scale, bias}
    pre_logits/{kernel, bias}                          # only if representation_size (in21k)
    head/{kernel, bias}

The ``_1``, ``_2``, ``_3`` suffixes are the pre-Linen global module counters the checkpoints were
written with; here they are explicit names, so no ``convert_pre_linen`` step is needed. Inputs
are expected in ``[-1, 1]`` (the checkpoints' preprocessing). Loading, position-embedding
resizing and head replacement live in :mod:`wtjax.models.vit_checkpoint`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from wtjax.core import precision

#: Standard sizes (ViT paper Table 1; Ti/S from AugReg, "How to train your ViT?").
VARIANTS = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    # A test-sized model with the same parameter layout.
    "tiny": dict(width=16, depth=2, mlp_dim=32, num_heads=2),
}


def vit_fields(variant: str) -> dict:
    """ViT dataclass fields of a named variant such as ``'B/16'`` or ``'tiny/4'``.

    Args:
      variant: ``'<size>/<patch>'`` with size in :data:`VARIANTS`.

    Returns:
      A dict of ``width, depth, mlp_dim, num_heads, patch_size`` for ``build_model('vit', ...)``.
    """
    size, _, patch = variant.partition("/")
    if size not in VARIANTS or not patch.isdigit():
        raise ValueError(
            f"unknown ViT variant {variant!r}; use '<size>/<patch>' with size in {list(VARIANTS)}"
        )
    return {**VARIANTS[size], "patch_size": int(patch)}


class MlpBlock(nn.Module):
    """Transformer feed-forward block: ``Dense_1(dropout(gelu(Dense_0(x))))`` (``dtype``: compute dtype)."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        init = dict(
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(1e-6),
            dtype=self.dtype,
        )
        y = nn.Dense(self.mlp_dim, name="Dense_0", **init)(x)
        y = nn.gelu(y)  # tanh approximation: flax default, what the checkpoints used
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        y = nn.Dense(x.shape[-1], name="Dense_1", **init)(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer encoder block (MHSA + MLP), public checkpoint names.

    ``x -> x + MHSA(LN(x)) -> x + MLP(LN(x))``; maps ``(batch, tokens, width)`` to the same
    shape, so it can also be the reused block of :class:`wtjax.Tied` (SPIN/isotropic ViTs).

    Attributes:
      mlp_dim: hidden size of the MLP.
      num_heads: attention heads (``width % num_heads == 0``).
      dropout_rate: dropout after attention and inside/after the MLP.
      attention_dropout_rate: dropout on the attention weights.
      dtype: compute dtype (``None``: promotion); the attention softmax then runs in float32
        (:func:`wtjax.core.precision.attention_kwargs`).
    """

    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        if x.ndim != 3:
            raise ValueError(f"EncoderBlock expects (batch, tokens, width), got shape {x.shape}")
        if x.shape[-1] % self.num_heads:
            raise ValueError(f"width {x.shape[-1]} is not divisible by num_heads={self.num_heads}")
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            **precision.attention_kwargs(self.dtype),
            kernel_init=nn.initializers.xavier_uniform(),
            broadcast_dropout=False,
            dropout_rate=self.attention_dropout_rate,
            deterministic=deterministic,
            name="MultiHeadDotProductAttention_1",
        )(y, y)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name="MlpBlock_3")(
            y, deterministic=deterministic
        )
        return x + y


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al.) with the public checkpoint parameter layout.

    ``__call__(images, *, train=False, return_intermediates=False) -> (logits, out)`` with
    ``out['pre_logits']`` (the head's input) and, if requested, ``out['block_outputs']``
    (``(depth, batch, tokens, width)``).

    Attributes:
      num_classes: head outputs (0 = no head; logits are then the pre-logits).
      patch_size: square patch side P (the stem is a P x P stride-P conv).
      width, depth, mlp_dim, num_heads: transformer sizes (see :data:`VARIANTS`).
      classifier: ``'token'`` (cls token, the public checkpoints) or ``'gap'`` (mean of tokens).
      representation_size: width of the tanh ``pre_logits`` layer (in21k checkpoints: = width);
        ``None`` drops it (the fine-tuning default of vision_transformer).
      dropout_rate, attention_dropout_rate: dropout rates (0 in fine-tuning).
      dtype: compute dtype, ``'float32'`` or ``'bfloat16'`` (:mod:`wtjax.core.precision`); parameters
        and logits stay float32.
    """

    num_classes: int = 1000
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    classifier: str = "token"
    representation_size: int | None = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: str = "float32"

    @nn.compact
    def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
        if images.ndim != 4:
            raise ValueError(f"ViT expects NHWC images, got shape {images.shape}")
        p = self.patch_size
        if images.shape[1] % p or images.shape[2] % p:
            raise ValueError(f"image size {images.shape[1:3]} is not a multiple of patch_size={p}")
        dtype = precision.layer_dtype(self.dtype)
        x = embed_patches(self, images, dtype)
        encoder = Encoder(
            self.depth,
            self.mlp_dim,
            self.num_heads,
            self.dropout_rate,
            self.attention_dropout_rate,
            dtype,
            name="Transformer",
        )
        x, block_outputs = encoder(x, train=train)
        x = x[:, 0] if self.classifier == "token" else x.mean(axis=1)
        if self.representation_size is not None:
            x = jnp.tanh(nn.Dense(self.representation_size, dtype=dtype, name="pre_logits")(x))
        out = {"pre_logits": x}
        if return_intermediates:
            out["block_outputs"] = jnp.stack(block_outputs)
        if self.num_classes:
            x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=dtype, name="head")(x)
        return precision.upcast(x), out


def embed_patches(module: nn.Module, images, dtype):
    """Patch embedding ``embedding`` (and the ``cls`` token if ``classifier='token'``) in ``module``'s
    compact scope: ``(B, tokens, width)`` in ``dtype``.

    ``module`` needs ``patch_size``, ``width`` and ``classifier`` (``'token'`` or ``'gap'``).
    """
    if module.classifier not in ("token", "gap"):
        raise ValueError(f"classifier must be 'token' or 'gap', got {module.classifier!r}")
    p = module.patch_size
    embed = nn.Conv(module.width, (p, p), strides=(p, p), padding="VALID", dtype=dtype, name="embedding")
    x = embed(precision.cast(images, dtype))
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if module.classifier == "token":
        cls = module.param("cls", nn.initializers.zeros, (1, 1, c))
        x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (n, 1, 1)), x], axis=1)
    return x


class Encoder(nn.Module):
    """The ``Transformer`` scope: ``posembed_input`` + ``depth`` ``encoderblock_*`` + ``encoder_norm``.

    Returns ``(encoded, block_outputs)``, the latter a list of each block's output. ``dtype``:
    compute dtype (``None``: promotion).
    """

    depth: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        x = AddPositionEmbs(name="posembed_input")(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        outputs = []
        for i in range(self.depth):
            block = EncoderBlock(
                self.mlp_dim,
                self.num_heads,
                self.dropout_rate,
                self.attention_dropout_rate,
                self.dtype,
                name=f"encoderblock_{i}",
            )
            x = block(x, deterministic=not train)
            outputs.append(x)
        return nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x), outputs


class AddPositionEmbs(nn.Module):
    """Adds a learned ``pos_embedding`` of shape ``(1, tokens, width)`` (init N(0, 0.02), as BERT).

    The float32 embedding is cast to the tokens' dtype, so bfloat16 tokens stay bfloat16.
    """

    @nn.compact
    def __call__(self, x):
        pe = self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
        return x + pe.astype(x.dtype)
