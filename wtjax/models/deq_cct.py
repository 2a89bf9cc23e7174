"""DEQ form of the CCT: the encoder's ``depth``-fold reuse replaced by a fixed point.

``z* = f(z*, x)`` with ``f(z, x) = CCTEncoderLayer(z + x)``: the tokens (plus position embedding)
``x`` are injected at every iteration, so ``z*`` depends on the input, and from ``z_0 = 0`` the
first iterate is the tied CCT's first layer output. The tokenizer, pooling and classifier are
those of :class:`wtjax.models.cct.CCT` (same parameter names); the layer lives under
``tied/block/layer`` (created by :class:`wtjax.core.tied.Tied`, as in the other DEQ models). Solver,
gradient modes, pretraining phase, metrics and ``aux_loss``: :class:`wtjax.models.deq.DEQBase`.
Dropout and stochastic depth are off inside the solver (the map must be deterministic).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from wtjax.core import precision
from wtjax.models.cct import CCTEncoderLayer, embed_tokens, pool_and_classify
from wtjax.models.deq import _CALL_DOC, DEQBase


class InjectedCCTLayer(nn.Module):
    """``f(z, x) = CCTEncoderLayer(z + x)`` (deterministic; ``dtype``: compute dtype)."""

    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, z, x):
        layer = CCTEncoderLayer(
            self.num_heads, self.mlp_dim, 0.0, 0.0, 0.0, deterministic=True, dtype=self.dtype, name="layer"
        )
        return layer(z + x)


class DEQCCT(DEQBase):
    """DEQ over the CCT encoder layer; returns ``(logits, out)`` like the other DEQ models.

    Attributes:
      num_classes, embed_dim, num_heads, mlp_ratio, n_conv_layers, kernel_size, conv_hidden:
        as :class:`wtjax.models.cct.CCT`.
      (solver fields: :class:`wtjax.models.deq.DEQBase`; ``depth`` is the pretraining depth.)
    """

    num_classes: int = 10
    embed_dim: int = 256
    num_heads: int = 4
    mlp_ratio: float = 2.0
    n_conv_layers: int = 1
    kernel_size: int = 3
    conv_hidden: int = 64

    def _block(self, **kw):
        dtype = precision.layer_dtype(self.dtype)
        return InjectedCCTLayer(self.num_heads, int(self.embed_dim * self.mlp_ratio), dtype, **kw)

    @nn.compact
    def __call__(self, images, *, train=False, step=None, max_iter=None, return_intermediates=False):
        x = embed_tokens(self, images)
        z, metrics, aux = self._solve(x, train=train, step=step, max_iter=max_iter)
        logits, pooled = pool_and_classify(z, self.num_classes, precision.layer_dtype(self.dtype))
        out = {"tokens": x, "pre_logits": pooled, "metrics": metrics, "aux_loss": aux}
        if return_intermediates:
            out["block_outputs"] = z[None]
        return logits, out

    __call__.__doc__ = _CALL_DOC
