"""Compact Convolutional Transformer (CCT, Hassani et al. 2021) with a tied encoder.

Layout after SHI-Labs/Compact-Transformers (``src/cct.py``, ``src/utils/transformers.py``)::

    tokens = [maxpool_{3,2,1}(relu(conv_{k x k, stride 1, no bias}(.)))] x n_conv_layers   (tokenizer)
    x = tokens + pos_embedding                                   learnable, trunc-normal(0.2)
    x = encoder_layer(x)  x depth                                (Tied: not_tied / tied / shared)
    x = LayerNorm(x);  pooled = softmax_tokens(Dense_1(x))^T x    sequence pooling
    logits = Dense(pooled)

    encoder_layer(x):  x = x + drop_path(MHSA(LN_pre(x)));  x = LN_1(x)
                       x = x + drop_path(dropout(Dense_2(dropout(gelu(Dense_1(x))))))

(the public code's hybrid pre/post norm). Attention: ``qkv`` Dense without bias, ``proj`` with
bias; Linear weights trunc-normal(0.02), biases 0, as the public code initialises them.

Deviations: stochastic depth is a constant rate per layer (``drop_path``; the public code ramps
``linspace(0, 0.1, L)``, whose mean 0.05 is our default), because a tied layer cannot know its
depth; the paper's weight-tied CCT masks the attention and MLP kernels (the default mask
predicate: every ``kernel``), and recommends density 0.9 for transformers.

Parameter count, embedding ``D``, MLP ``M = mlp_ratio D``, ``T`` tokens, ``n`` classes, 1 conv
layer of kernel ``k``::

    tokenizer 3 k^2 D      pos T D      layer 3D^2 + (D^2 + D) + (D M + M) + (M D + D) + 4D
    final norm 2D          pool D + 1   head D n + n

CCT-7/3x1 on 32x32 CIFAR-10 (``D=256, M=512, T=256``): 3,760,139 (the public model's 3.76M).

Mixed precision (``dtype``, :mod:`wtjax.core.precision`): both softmaxes (attention, sequence
pooling) run in float32, every matmul and convolution in the compute dtype.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from wtjax.core import precision
from wtjax.core.masks import MaskSpec
from wtjax.models.tying import SpinModel, run_tie

#: CCT sizes: the public CIFAR models and the small one of the paper's Table 1b (0.96M).
VARIANTS = {
    "7/3x1": dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, n_conv_layers=1, kernel_size=3),
    "7/3x2": dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0, n_conv_layers=2, kernel_size=3),
    "6/3x1": dict(embed_dim=256, depth=6, num_heads=4, mlp_ratio=2.0, n_conv_layers=1, kernel_size=3),
    "4/3x2": dict(embed_dim=128, depth=4, num_heads=2, mlp_ratio=1.0, n_conv_layers=2, kernel_size=3),
    "2/3x2": dict(embed_dim=128, depth=2, num_heads=2, mlp_ratio=1.0, n_conv_layers=2, kernel_size=3),
    # CCT-7 Small of the paper's Table 1b: CCT-7/3x1 at width 128 (0.96M parameters).
    "7/3x1-small": dict(embed_dim=128, depth=7, num_heads=2, mlp_ratio=2.0, n_conv_layers=1, kernel_size=3),
    "tiny": dict(embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0, n_conv_layers=1, kernel_size=3),
}
_ATTENTION_LAYERS = ("self_attn", "pre_norm")
_MLP_LAYERS = ("linear1", "linear2", "norm1")
#: ``share_params`` names and the block parameters they share (``None``: all of them).
SHARE_PREDICATES = {
    "all": None,
    "attention": lambda path, leaf: path[0] in _ATTENTION_LAYERS,
    "mlp": lambda path, leaf: path[0] in _MLP_LAYERS,
}
SHARE_PARAMS = tuple(SHARE_PREDICATES)

_dense_init = dict(kernel_init=nn.initializers.truncated_normal(0.02), bias_init=nn.initializers.zeros)


def drop_path(x, rate: float, deterministic: bool, rng_module: nn.Module):
    """Stochastic depth: zero a sample's residual branch w.p. ``rate``, scale survivors by ``1/(1-rate)``."""
    if deterministic or rate == 0.0:
        return x
    keep = jax.random.bernoulli(
        rng_module.make_rng("dropout"), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1)
    )
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (no bias) and ``proj``.

    ``dtype``: compute dtype of the projections and einsums (``None``: promotion); the softmax
    runs in at least float32.
    """

    num_heads: int
    attention_dropout: float = 0.1
    dropout: float = 0.0
    deterministic: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"embedding {d} is not divisible by {self.num_heads} heads")
        qkv = nn.Dense(
            3 * d, use_bias=False, dtype=self.dtype, name="qkv", kernel_init=_dense_init["kernel_init"]
        )(x)
        q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 2, 0)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.num_heads).astype(x.dtype)
        attn = jax.nn.softmax(precision.upcast(logits), axis=-1).astype(v.dtype)
        attn = nn.Dropout(self.attention_dropout)(attn, deterministic=self.deterministic)
        y = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
        y = nn.Dense(d, dtype=self.dtype, name="proj", **_dense_init)(y)
        return nn.Dropout(self.dropout)(y, deterministic=self.deterministic)


class CCTEncoderLayer(nn.Module):
    """CCT's transformer encoder layer ``x -> x`` (the reused block of the tied forms).

    ``dtype``: compute dtype (``None``: promotion).
    """

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    attention_dropout: float = 0.1
    drop_path: float = 0.05
    deterministic: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        det, dtype = self.deterministic, self.dtype
        attention = Attention(
            self.num_heads, self.attention_dropout, self.dropout, det, dtype, name="self_attn"
        )
        h = attention(nn.LayerNorm(dtype=dtype, name="pre_norm")(x))
        x = nn.LayerNorm(dtype=dtype, name="norm1")(x + drop_path(h, self.drop_path, det, self))
        h = nn.gelu(nn.Dense(self.mlp_dim, dtype=dtype, name="linear1", **_dense_init)(x), approximate=False)
        h = nn.Dense(x.shape[-1], dtype=dtype, name="linear2", **_dense_init)(
            nn.Dropout(self.dropout)(h, deterministic=det)
        )
        h = nn.Dropout(self.dropout)(h, deterministic=det)
        return x + drop_path(h, self.drop_path, det, self)


def embed_tokens(module: nn.Module, images):
    """Tokenizer + learnable position embedding, created in ``module``'s compact scope.

    ``module`` needs ``embed_dim, n_conv_layers, kernel_size, conv_hidden, dtype``. Returns
    ``(B, T, embed_dim)`` tokens (public code: stride ``max(1, k//2 - 1)``, padding ``max(1, k//2)``)
    in the compute dtype.
    """
    dtype = precision.layer_dtype(module.dtype)
    x = precision.cast(images, dtype)
    k = (module.kernel_size, module.kernel_size)
    pad = max(1, module.kernel_size // 2)
    stride = max(1, module.kernel_size // 2 - 1)
    for i in range(module.n_conv_layers):
        out = module.embed_dim if i == module.n_conv_layers - 1 else module.conv_hidden
        conv = nn.Conv(
            out,
            k,
            strides=stride,
            padding=[(pad, pad)] * 2,
            use_bias=False,
            dtype=dtype,
            name=f"tokenizer_conv{i}",
        )
        x = conv(x)
        x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    pos = module.param("pos_embedding", nn.initializers.truncated_normal(0.2), (1,) + x.shape[1:])
    return x + pos.astype(x.dtype)


def pool_and_classify(x, num_classes: int, dtype=None):
    """Final LayerNorm, sequence pooling and the classifier (inside a compact scope): ``(logits, pooled)``.

    ``dtype``: compute dtype of the layers (``None``: promotion); the pooling softmax runs in at
    least float32 and the logits are returned in at least float32.
    """
    x = nn.LayerNorm(dtype=dtype, name="norm")(x)
    scores = precision.upcast(nn.Dense(1, dtype=dtype, name="attention_pool", **_dense_init)(x))
    weights = jax.nn.softmax(scores, axis=1).astype(x.dtype)
    pooled = jnp.sum(weights * x, axis=1)
    logits = nn.Dense(num_classes, dtype=dtype, name="fc", **_dense_init)(pooled)
    return precision.upcast(logits), pooled


class CCT(SpinModel):
    """CCT classifier returning ``(logits, out)`` (model contract in :mod:`wtjax.models`).

    Attributes:
      num_classes: classifier outputs.
      embed_dim, depth, num_heads, mlp_ratio: the transformer encoder (``CCT-<depth>``).
      n_conv_layers, kernel_size, conv_hidden: the tokenizer (``<kernel>x<n_conv_layers>``;
        intermediate convs have ``conv_hidden`` channels, as the public code's 64).
      dropout, attention_dropout, drop_path: regularisation (public defaults 0, 0.1, 0.1 ramp).
      (tie and SPIN fields: :class:`~wtjax.models.tying.SpinModel`: ``form`` ``not_tied`` (CCT),
      ``tied`` (one encoder layer reused ``depth`` times, by default with the paper's multi-masks)
      or ``shared``; ``share_params`` in ``all``/``attention``/``mlp``.)
    """

    mask: MaskSpec = MaskSpec(density=0.9)
    share_rate: int = 1
    SHARE_PREDICATES = SHARE_PREDICATES

    num_classes: int = 10
    embed_dim: int = 256
    depth: int = 7
    num_heads: int = 4
    mlp_ratio: float = 2.0
    n_conv_layers: int = 1
    kernel_size: int = 3
    conv_hidden: int = 64
    dropout: float = 0.0
    attention_dropout: float = 0.1
    drop_path: float = 0.05

    @nn.compact
    def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
        """Classify NHWC ``images``; ``out`` has ``tokens`` (tokenizer output + position embedding),
        ``pre_logits`` (the pooled features) and, if requested, ``block_outputs``."""
        tokens = embed_tokens(self, images)
        x = nn.Dropout(self.dropout)(tokens, deterministic=not train)
        layer = CCTEncoderLayer(
            self.num_heads,
            int(self.embed_dim * self.mlp_ratio),
            self.dropout,
            self.attention_dropout,
            self.drop_path,
            deterministic=not train,
            dtype=precision.layer_dtype(self.dtype),
        )
        tied = self.tie(layer, depth=self.depth, name=self.TIE_NAME)
        x, xs = run_tie(tied, x, train=train, return_intermediates=return_intermediates)
        logits, pooled = pool_and_classify(x, self.num_classes, precision.layer_dtype(self.dtype))
        out = {"tokens": tokens, "pre_logits": pooled}
        if return_intermediates:
            out["block_outputs"] = xs
        return logits, out
