"""Differentiable fixed points ``z* = f(params, x, z*)`` with a choice of backward pass.

The invariant everything here rests on: the forward result satisfies ``f(params, x, z*) ~= z*``
(up to the solver's tolerance). Parameters are explicit arguments (any pytree), never captured by
a closure, so ``f`` is a pure function and gradients reach ``params`` and ``x``.

Backward modes (``grad=``):

* ``ift`` (implicit function theorem). For a loss cotangent ``g = dL/dz*``, with ``J = df/dz`` at
  ``z*``, ``dL/dparams = u^T df/dparams`` where ``u = (I - J)^{-T} g``, i.e. ``u`` solves the
  linear fixed point ``u = J^T u + g``; it is solved with any solver (``backward`` config) using
  one vector-Jacobian product per iteration. Implemented as an implicit JVP rule
  (``jax.custom_jvp``: ``dz* = (I - J)^{-1} df``, a ``lax.custom_linear_solve`` whose transpose
  is the adjoint solve), as optimistix does, so ``jax.grad``, ``jax.jacfwd``, Hessians and
  ``grad(grad(...))`` all work; each derivative order adds linear solves with ``backward``.
* ``phantom``: ``k`` damped steps ``z <- tau f(params, x, z) + (1 - tau) z`` from
  ``stop_gradient(z*)``, differentiated by autodiff (Geng et al., 2021). The returned value is the
  result of those steps.
* ``one_step``: ``phantom`` with ``k = 1, tau = 1``: ``z = f(params, x, stop_gradient(z*))``, the
  gradient ``g^T df/dparams`` (Jacobian-free backprop; torchdeq's default without IFT).
* ``unrolled``: plain autodiff through the solver's iterations (``lax.scan``), the reference the
  others are tested against; memory grows with ``max_iter``.

No mode returns silent zero gradients: the backward solve starts at ``u = 0`` but never returns
that start (its residual is ``||g||``, under ``tol`` for a small enough loss), a backward solve
that does not converge returns its lowest-residual iterate (see
:func:`wtjax.implicit.solvers.solve`), and :func:`adjoint_solve` exposes the backward solve so
its health can be measured. ``tol`` in ``stop_mode='abs'`` is absolute (as torchdeq's): scale it
with the loss, or use ``stop_mode='rel'``, which is scale-free.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from wtjax.implicit.solvers import BACKWARD_DEFAULT, FORWARD_DEFAULT, SolverConfig, solve

GRAD_MODES = ("ift", "phantom", "one_step", "unrolled")


def _linear_solver(cfg: SolverConfig):
    """``solve(matvec, b)`` for :func:`jax.lax.custom_linear_solve`, with ``matvec = I - K``.

    It solves ``matvec(u) = b`` as the fixed point ``u = u - matvec(u) + b = K u + b`` with the
    configured solver, starting at ``u = 0`` but never returning that start (``count_initial``):
    its residual is ``||b||``, below ``tol`` for a small enough loss, and returning it would be an
    exactly-zero gradient. A solve that fails returns its lowest-residual iterate.
    """

    def linear_solve(matvec, b):
        u, _ = solve(lambda u: u - matvec(u) + b, jnp.zeros_like(b), cfg, count_initial=False)
        return u

    return linear_solve


def adjoint_solve(f, params, x, z_star, g, cfg: SolverConfig = BACKWARD_DEFAULT):
    """Solve ``u = J^T u + g`` with ``J = d f(params, x, z) / dz`` at ``z_star``.

    The backward solve of ``grad='ift'``, exposed to measure its health. It starts at ``u = 0``
    but never returns that start (a gradient that is exactly zero is never the solver's doing).

    Args:
      f: ``f(params, x, z) -> z``.
      params, x: the arguments of ``f`` (treated as constants here).
      z_star: the fixed point (batch axis 0).
      g: the cotangent, shaped like ``z_star``.
      cfg: the solver for the linear fixed point (torchdeq's backward default: tol 1e-6).

    Returns:
      ``(u, stats, vjp)`` where ``vjp(u) = (u^T df/dparams, u^T df/dx, u^T df/dz)``.
    """
    _, vjp = jax.vjp(f, params, x, z_star)
    u, stats = solve(lambda u: vjp(u)[2] + g, jnp.zeros_like(g), cfg, count_initial=False)
    return u, stats, vjp


def _zero_tangent(a):
    """A zero tangent for ``a`` (``float0`` for integer and boolean arrays, as JAX requires)."""
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _ift_fixed_point(f, forward, backward, params, x, z0):
    return solve(lambda z: f(params, x, z), z0, forward)


@_ift_fixed_point.defjvp
def _ift_jvp(f, forward, backward, primals, tangents):
    """``dz* = (I - J)^{-1} (df/dparams dparams + df/dx dx)``, by a transposable linear solve.

    Reverse mode transposes it (``custom_linear_solve``'s transpose is the adjoint solve
    ``u = J^T u + g``), forward mode uses it as is, and since the rule calls
    ``_ift_fixed_point`` itself and differentiates only ``f``, derivatives of any order work.
    """
    params, x, z0 = primals
    d_params, d_x, _ = tangents  # z* does not depend on the initial guess
    z, stats = _ift_fixed_point(f, forward, backward, params, x, z0)
    _, rhs = jax.jvp(lambda p, x: f(p, x, z), (params, x), (d_params, d_x))
    _, jac_z = jax.linearize(lambda z: f(params, x, z), z)
    linear_solve = _linear_solver(backward)
    dz = jax.lax.custom_linear_solve(
        lambda v: v - jac_z(v), rhs, solve=linear_solve, transpose_solve=linear_solve
    )
    return (z, stats), (dz, jax.tree.map(_zero_tangent, stats))


def fixed_point(
    f,
    params,
    x,
    z0: jax.Array,
    *,
    forward: SolverConfig = FORWARD_DEFAULT,
    backward: SolverConfig = BACKWARD_DEFAULT,
    grad: str = "ift",
    phantom_steps: int = 1,
    phantom_tau: float = 1.0,
):
    """Solve ``z* = f(params, x, z*)`` and make ``z*`` differentiable in ``params`` and ``x``.

    Works under ``jit`` and ``vmap``. Example::

        def f(w, x, z):
            return jnp.tanh(z @ w.T + x)

        z, stats = fixed_point(f, w, x, jnp.zeros_like(x))
        loss = lambda w: jnp.sum(fixed_point(f, w, x, jnp.zeros_like(x))[0] ** 2)
        jax.grad(loss)(w)

    Args:
      f: ``f(params, x, z) -> z``, pure; axis 0 of ``z`` is the batch.
      params: pytree of parameters (differentiable).
      x: pytree of inputs, e.g. the injection (differentiable).
      z0: initial state (not differentiated: the fixed point does not depend on it).
      forward: forward solver (:class:`SolverConfig`).
      backward: solver of the adjoint system (``grad='ift'`` only).
      grad: ``ift``, ``phantom``, ``one_step`` or ``unrolled`` (module docstring).
      phantom_steps: ``k`` of the phantom gradient.
      phantom_tau: damping of the phantom steps.

    Returns:
      ``(z, stats)``: the fixed point (after the phantom steps for ``phantom``/``one_step``) and
      the forward solver's :class:`~wtjax.implicit.solvers.SolverStats`.
    """
    if grad not in GRAD_MODES:
        raise ValueError(f"unknown grad mode {grad!r}; choose one of {GRAD_MODES}")
    z0 = jax.lax.stop_gradient(z0)
    if grad == "ift":
        return _ift_fixed_point(f, forward, backward, params, x, z0)
    if grad == "unrolled":
        return solve(lambda z: f(params, x, z), z0, forward, differentiable=True)
    if grad == "one_step":
        phantom_steps, phantom_tau = 1, 1.0
    if phantom_steps < 1 or not 0.0 < phantom_tau <= 1.0:
        raise ValueError(f"phantom needs steps >= 1 and tau in (0, 1]; got {phantom_steps}, {phantom_tau}")
    z_star, stats = solve(
        lambda z: f(jax.lax.stop_gradient(params), jax.lax.stop_gradient(x), z), z0, forward
    )
    z = jax.lax.stop_gradient(z_star)
    for _ in range(phantom_steps):
        z = phantom_tau * f(params, x, z) + (1.0 - phantom_tau) * z
    return z, stats
