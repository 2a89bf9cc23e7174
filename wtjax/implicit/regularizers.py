"""DEQ stabilisers: Jacobian regularisation and a fixed-point residual (correction) loss.

Both take ``f(params, x, z)`` with explicit parameters and are differentiable in ``params`` (and
``x``); the state ``z`` is held constant (``stop_gradient``), as in torchdeq.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def jacobian_penalty(f, params, x, z, key: jax.Array, num_vectors: int = 1) -> jax.Array:
    """Hutchinson estimate of ``||J||_F^2 / dim`` with ``J = d f(params, x, z) / dz``.

    For ``v ~ N(0, I)``, ``E ||v^T J||^2 = ||J||_F^2``; with a batch the Jacobian is block
    diagonal, so the estimate is ``sum_b ||v_b^T J_b||^2 / (num_vectors * z.size)``, i.e. the
    per-sample ``||J_b||_F^2 / d`` averaged over the batch (torchdeq's ``jac_reg``: squared norm of
    the vector-Jacobian product divided by the number of vectors and ``numel(z)``). Uses
    reverse mode only (works with custom-VJP layers).

    Args:
      f: ``f(params, x, z) -> z``.
      params, x: arguments of ``f``; the penalty is differentiable in them.
      z: where to evaluate the Jacobian (usually the fixed point).
      key: PRNG key for the probe vectors.
      num_vectors: probe vectors averaged.

    Returns:
      A scalar.
    """
    z = jax.lax.stop_gradient(z)
    _, vjp = jax.vjp(lambda z: f(params, x, z), z)
    vs = jax.random.normal(key, (num_vectors,) + z.shape, z.dtype)
    vjs = jax.vmap(lambda v: vjp(v)[0])(vs)
    return jnp.sum(vjs**2) / (num_vectors * z.size)


def fixed_point_residual_loss(f, params, x, z) -> jax.Array:
    """Mean over the batch of ``||f(params, x, z) - z||^2 / (||f(params, x, z)||^2 + eps)``.

    A fixed-point correction term: it pulls ``f`` towards having ``z`` (the solver's answer) as an
    exact fixed point. (torchdeq's trajectory "fixed-point correction" applies the task loss to
    intermediate iterates instead; that needs the labels, which a model does not see.)
    """
    z = jax.lax.stop_gradient(z)
    fz = f(params, x, z)
    axes = tuple(range(1, z.ndim))
    num = jnp.sum((fz - z) ** 2, axis=axes)
    return jnp.mean(num / (jnp.sum(fz**2, axis=axes) + 1e-8))
