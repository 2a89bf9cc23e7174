"""Mixed precision: the compute dtype of a model, named by its ``dtype`` field (``config.model.dtype``).

The policy, the same for every model family:

* **float32**: the parameters (always created in float32, so the optimizer state is float32
  too), normalisation statistics (Flax's norms reduce in float32 whatever their ``dtype``),
  softmax, the logits a model returns (hence the loss), and the state, residuals and linear
  algebra of the DEQ and monDEQ solvers;
* **the compute dtype**: activations and the inputs of every matmul and convolution. The images
  are cast at the stem, each layer casts its float32 parameters when it uses them (the gradient
  flows back to the float32 master weight through that cast), and a tie's masks are applied to
  the cast kernels (:class:`wtjax.core.tied.Tied`; masks are 0/1, so this is exact).

``'float32'`` (the default) changes nothing: layers get ``dtype=None`` and promote their inputs
and parameters as they always did, so float32 runs are bit-identical to runs without a policy
(and float64 inputs under ``jax.enable_x64`` still compute in float64). ``'bfloat16'`` is the
choice for TPUs and recent GPUs. On CPU it is slower than float32: XLA:CPU emulates most bfloat16
arithmetic. float16 is not offered: without loss scaling, which the training step does not do,
its small exponent range underflows gradients.

This module imports only jax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: The accepted ``dtype`` names and their compute dtypes.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> jnp.dtype:
    """The compute dtype named ``name`` (``'float32'`` or ``'bfloat16'``).

    Raises:
      ValueError: any other name (the message lists the accepted ones).
    """
    if not isinstance(name, str) or name not in DTYPES:
        hint = " (float16 would need loss scaling)" if name == "float16" else ""
        raise ValueError(
            f"unknown compute dtype {name!r}{hint}; choose one of {sorted(DTYPES)} "
            "(e.g. --config.model.dtype=bfloat16)"
        )
    return jnp.dtype(DTYPES[name])


def layer_dtype(name: str | None) -> jnp.dtype | None:
    """The ``dtype=`` to give layers for the policy ``name``: ``None`` for float32 (or ``None``).

    ``None`` keeps Flax's default type promotion, which is what keeps float32 runs unchanged.
    """
    if name is None:
        return None
    dtype = compute_dtype(name)
    return None if dtype == jnp.float32 else dtype


def cast(x: jax.Array, dtype: jnp.dtype | None) -> jax.Array:
    """``x`` in ``dtype`` (a :func:`layer_dtype`); unchanged when ``dtype`` is None."""
    return x if dtype is None else x.astype(dtype)


def upcast(x: jax.Array) -> jax.Array:
    """``x`` in at least float32: half-precision values become float32, float64 stays float64.

    Used for what must not be computed in half precision: returned logits, solver states.
    """
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def norm_class(norm_cls, dtype: jnp.dtype | None):
    """``norm_cls`` (a Flax norm) to use at compute dtype ``dtype`` (a :func:`layer_dtype`).

    Under half precision the norm is rematerialised: Flax normalises in float32, and its float32
    intermediates would otherwise be saved for the backward pass (measured on the TPU target:
    bfloat16 steps kept 0.8x the float32 temporaries). Recomputing them from the saved
    half-precision input costs a few elementwise ops. float32 keeps the class as is.
    """
    if dtype is None:
        return norm_cls
    import flax.linen as nn  # here: the rest of this module needs only jax

    return nn.remat(norm_cls)


def _weights_value_einsum(subscripts, weights, value):
    # The softmax ran in float32; the weighted sum is a matmul, so it runs in the compute dtype.
    return jnp.einsum(subscripts, weights.astype(value.dtype), value)


def _weights_value_einsum_cls():
    return _weights_value_einsum


def _query_key_einsum_cls():
    return jnp.einsum  # Flax wants both einsums when one is given; this one is the default


def attention_kwargs(dtype: jnp.dtype | None) -> dict:
    """Fields for ``nn.MultiHeadDotProductAttention`` under the compute ``dtype`` (a :func:`layer_dtype`).

    Both attention einsums run in ``dtype`` and the softmax in float32. Flax's
    ``force_fp32_for_softmax`` alone would leave float32 weights, which promote the second einsum
    to float32; casting them back to the value's dtype keeps that matmul in the compute dtype.
    Float32 (``None``) gives no fields: Flax's defaults.
    """
    if dtype is None:
        return {}
    return dict(
        dtype=dtype,
        force_fp32_for_softmax=True,
        qk_attn_weights_einsum_cls=_query_key_einsum_cls,
        attn_weights_value_einsum_cls=_weights_value_einsum_cls,
    )
