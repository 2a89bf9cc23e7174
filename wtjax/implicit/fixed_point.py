"""Differentiable fixed points ``z* = f(params, x, z*)`` with a choice of backward pass.

The invariant everything here rests on: the forward result satisfies ``f(params, x, z*) ~= z*``
(up to the solver's tolerance). Parameters are explicit arguments (any pytree), never captured by
a closure, so ``f`` is a pure function and gradients reach ``params`` and ``x``.

Backward modes (``grad=``):

* ``ift`` (implicit function theorem). For a loss cotangent ``g = dL/dz*``, with ``J = df/dz`` at
  ``z*``, ``dL/dparams = u^T df/dparams`` where ``u = (I - J)^{-T} g``, i.e. ``u`` solves the
  linear fixed point ``u = J^T u + g``; it is solved with any solver (``backward`` config) using
  one vector-Jacobian product per iteration. Implemented with ``jax.custom_vjp``.
* ``phantom``: ``k`` damped steps ``z <- tau f(params, x, z) + (1 - tau) z`` from
  ``stop_gradient(z*)``, differentiated by autodiff (Geng et al., 2021). The returned value is the
  result of those steps.
* ``one_step``: ``phantom`` with ``k = 1, tau = 1``: ``z = f(params, x, stop_gradient(z*))``, the
  gradient ``g^T df/dparams`` (Jacobian-free backprop; torchdeq's default without IFT).
* ``unrolled``: plain autodiff through the solver's iterations (``lax.scan``), the reference the
  others are tested against; memory grows with ``max_iter``.

No mode returns silent zero gradients: a backward solve that does not converge returns its
lowest-residual iterate (see :func:`wtjax.implicit.solvers.solve`), and :func:`adjoint_solve`
exposes the backward solve so its health can be measured.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wtjax.implicit.solvers import BACKWARD_DEFAULT, FORWARD_DEFAULT, SolverConfig, solve

GRAD_MODES = ("ift", "phantom", "one_step", "unrolled")


def adjoint_solve(f, params, x, z_star, g, cfg: SolverConfig = BACKWARD_DEFAULT):
    """Solve ``u = J^T u + g`` with ``J = d f(params, x, z) / dz`` at ``z_star``.

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
    u, stats = solve(lambda u: vjp(u)[2] + g, jnp.zeros_like(g), cfg)
    return u, stats, vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ift_fixed_point(f, forward, backward, params, x, z0):
    return solve(lambda z: f(params, x, z), z0, forward)


def _ift_fwd(f, forward, backward, params, x, z0):
    z, stats = solve(lambda z: f(params, x, z), z0, forward)
    return (z, stats), (params, x, z)


def _ift_bwd(f, forward, backward, residuals, cotangents):
    params, x, z = residuals
    g, _ = cotangents  # the stats are not differentiable
    u, _, vjp = adjoint_solve(f, params, x, z, g, backward)
    d_params, d_x, _ = vjp(u)
    # z* does not depend on the initial guess.
    return d_params, d_x, jnp.zeros_like(z)


_ift_fixed_point.defvjp(_ift_fwd, _ift_bwd)


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
