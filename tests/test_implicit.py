"""Invariants of the pure-JAX implicit machinery (wtjax.implicit): solvers, gradients, regularisers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wtjax.implicit import (
    SOLVERS,
    SolverConfig,
    adjoint_solve,
    fixed_point,
    fixed_point_residual_loss,
    jacobian_penalty,
    solve,
)

D, B = 6, 3


def _contraction(rng, radius, d=D, symmetric=False):
    a = rng.normal(size=(d, d))
    if symmetric:
        # Eigenvalues spread over [0, radius]: slow modes for plain iteration (ill-conditioned I - A).
        q, _ = np.linalg.qr(a)
        a = q @ np.diag(np.linspace(0.0, radius, d)) @ q.T
    else:
        a = radius * a / np.abs(np.linalg.eigvals(a)).max()
    return jnp.asarray(a)


def _tanh_map(w, x, z):
    return jnp.tanh(z @ w.T + x)


def _tanh_problem(seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(0.5 * rng.normal(size=(D, D)) / np.sqrt(D))
    x = jnp.asarray(rng.normal(size=(B, D)))
    c = jnp.asarray(rng.normal(size=(B, D)))  # loss weights: L = sum(c * z*)
    return w, x, c


@pytest.mark.parametrize(
    "solver,stop_mode", [("fixed_point", "abs"), ("anderson", "abs"), ("broyden", "abs"), ("anderson", "rel")]
)
def test_solvers_reach_the_linear_solution(solver, stop_mode):
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        a, b = _contraction(rng, 0.9), jnp.asarray(rng.normal(size=(B, D)))
        exact = jnp.linalg.solve(jnp.eye(D) - a, b.T).T
        # tol 1e-9: Anderson's absolute ridge (torchdeq's lam=1e-4) stalls it near 1e-10.
        cfg = SolverConfig(solver=solver, max_iter=400, tol=1e-9, stop_mode=stop_mode)
        f = lambda z: z @ a.T + b
        z, stats = solve(f, jnp.zeros((B, D)), cfg)
        np.testing.assert_allclose(z, exact, atol=1e-7)
        assert bool(jnp.all(stats.converged)) and not bool(jnp.any(stats.diverged))
        # The reported residuals are those of the returned iterate, and the lowest in the trace.
        abs_res = jnp.linalg.norm(f(z) - z, axis=-1)
        np.testing.assert_allclose(stats.abs_res, abs_res, rtol=1e-6, atol=1e-14)
        trace = stats.abs_trace if stop_mode == "abs" else stats.rel_trace
        best = stats.abs_res if stop_mode == "abs" else stats.rel_res
        np.testing.assert_allclose(best, jnp.nanmin(trace, axis=0))
        assert int(jnp.sum(jnp.isfinite(stats.abs_trace[:, 0]))) == int(stats.nstep)
        # The scan version (differentiable) takes the same path.
        z2, stats2 = solve(f, jnp.zeros((B, D)), cfg, differentiable=True)
        np.testing.assert_allclose(z2, z, atol=1e-12)
        assert int(stats2.nstep) == int(stats.nstep)


def test_acceleration_needs_fewer_iterations():
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        a, b = _contraction(rng, 0.98, d=12, symmetric=True), jnp.asarray(rng.normal(size=(B, 12)))
        f = lambda z: z @ a.T + b
        steps = {}
        for solver in SOLVERS:
            _, stats = solve(f, jnp.zeros((B, 12)), SolverConfig(solver=solver, max_iter=2000, tol=1e-8))
            assert bool(jnp.all(stats.converged)), solver
            steps[solver] = int(stats.nstep)
        assert steps["anderson"] * 4 < steps["fixed_point"], steps
        assert steps["broyden"] * 4 < steps["fixed_point"], steps


@pytest.mark.parametrize("solver", SOLVERS)
def test_divergence_is_flagged_and_best_iterate_kept(solver):
    z0 = jnp.ones((B, D))
    _, stats_ok = solve(lambda z: 0.5 * z, z0, SolverConfig(solver=solver, max_iter=100, tol=1e-4))
    assert not bool(jnp.any(stats_ok.diverged)) and bool(jnp.all(stats_ok.converged))
    # f(z) = 3 z + 1 has its fixed point at -1/2 but repels every iterate.
    z, stats = solve(lambda z: 3.0 * z + 1.0, z0, SolverConfig(solver="fixed_point", max_iter=100))
    assert bool(jnp.all(stats.diverged)) and not bool(jnp.any(stats.converged))
    assert int(stats.nstep) < 100  # the protective break fired
    np.testing.assert_allclose(z, z0)  # the initial point had the lowest residual
    # NaN from f: flagged at once, and NaN is returned (never a finite stand-in such as z0).
    z, stats = solve(lambda z: z * jnp.nan, z0, SolverConfig(solver=solver, max_iter=20))
    assert bool(jnp.all(stats.diverged)) and int(stats.nstep) == 1
    assert bool(jnp.all(jnp.isnan(z)))


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_nan_sample_does_not_poison_the_batch(solver):
    # Row 1's injection is NaN. On main the whole solve stopped at step 1 and returned z0 = 0 for
    # every row; now the clean rows converge exactly as they do alone and row 1 stays NaN.
    with jax.enable_x64(True):
        rng = np.random.default_rng(11)
        a = _contraction(rng, 0.8)
        b = jnp.asarray(rng.normal(size=(B, D))).at[1, 2].set(jnp.nan)
        cfg = SolverConfig(solver=solver, max_iter=200, tol=1e-10)
        z, stats = solve(lambda z: z @ a.T + b, jnp.zeros((B, D)), cfg)
        clean = jnp.asarray([0, 2])
        z_clean, _ = solve(lambda z: z @ a.T + b[clean], jnp.zeros((2, D)), cfg)
        np.testing.assert_allclose(z[clean], z_clean, atol=1e-9)
        assert stats.converged.tolist() == [True, False, True]
        assert stats.diverged.tolist() == [False, True, False]
        assert bool(jnp.all(jnp.isnan(z[1])))


def test_protective_break_spares_broyden_transients_and_stops_real_divergence():
    # Spectral radius 1.5: plain iteration diverges, but Broyden solves it after its residual
    # first grows ~1600x (it passed 1e3 at iteration 7, where the old default protect_thres=1e3
    # stopped it with relative error 0.88).
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        a = rng.normal(size=(32, 32))
        a = jnp.asarray(1.5 * a / np.abs(np.linalg.eigvals(a)).max())
        b = jnp.asarray(rng.normal(size=(2, 32)))
        f = lambda z: z @ a.T + b
        exact = jnp.linalg.solve(jnp.eye(32) - a, b.T).T
        z, stats = solve(f, jnp.zeros((2, 32)), SolverConfig(solver="broyden", max_iter=300, tol=1e-8))
        assert float(jnp.nanmax(stats.abs_trace / stats.abs_trace[0])) > 1e3  # the transient
        assert bool(jnp.all(stats.converged)) and not bool(jnp.any(stats.diverged))
        np.testing.assert_allclose(z, exact, rtol=1e-6, atol=1e-6)
        # Real divergence on the same problem: plain iteration is stopped within 40 iterations.
        z, stats = solve(f, jnp.zeros((2, 32)), SolverConfig(solver="fixed_point", max_iter=40))
        assert bool(jnp.all(stats.diverged)) and int(stats.nstep) < 40
        # protect_thres=None breaks on non-finite residuals only.
        _, stats = solve(f, jnp.zeros((2, 32)), SolverConfig(solver="fixed_point", protect_thres=None))
        assert int(stats.nstep) == 40 and not bool(jnp.any(stats.diverged))


def test_per_sample_residuals_and_batch_independence():
    # One sample starts at its fixed point: its residual is 0 and it is unaffected by the others.
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        a = _contraction(rng, 0.8)
        b = jnp.asarray(rng.normal(size=(B, D))).at[0].set(0.0)
        f = lambda z: z @ a.T + b
        cfg = SolverConfig(solver="anderson", max_iter=200, tol=1e-10)
        z, stats = solve(f, jnp.zeros((B, D)), cfg)
        assert stats.abs_res.shape == (B,) and stats.abs_trace.shape == (200, B)
        assert float(stats.abs_trace[0, 0]) == 0.0 and float(stats.abs_trace[0, 1]) > 0.0
        alone = jax.jit(lambda bi: solve(lambda z: z @ a.T + bi, jnp.zeros((1, D)), cfg)[0])
        for i in range(B):
            np.testing.assert_allclose(z[i : i + 1], alone(b[i : i + 1]), atol=1e-9)


@pytest.mark.parametrize("backward_solver", SOLVERS)
def test_ift_gradient_matches_finite_differences_and_unrolled(backward_solver):
    with jax.enable_x64(True):
        w, x, c = _tanh_problem()
        fwd = SolverConfig(solver="anderson", max_iter=200, tol=1e-13)
        bwd = SolverConfig(solver=backward_solver, max_iter=300, tol=1e-13)

        def loss(w, x, grad):
            z, _ = fixed_point(_tanh_map, w, x, jnp.zeros_like(x), forward=fwd, backward=bwd, grad=grad)
            return jnp.sum(c * z)

        gw, gx = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(w, x, "ift")
        # Reference 1: central finite differences along random directions.
        value = jax.jit(loss, static_argnums=2)
        rng = np.random.default_rng(4)
        for _ in range(2):
            dw, dx = jnp.asarray(rng.normal(size=w.shape)), jnp.asarray(rng.normal(size=x.shape))
            eps = 1e-6
            fd = (value(w + eps * dw, x + eps * dx, "ift") - value(w - eps * dw, x - eps * dx, "ift")) / (
                2 * eps
            )
            np.testing.assert_allclose(jnp.sum(gw * dw) + jnp.sum(gx * dx), fd, rtol=1e-6)
        if backward_solver != "anderson":
            return  # one unrolled reference is enough (it is the slowest part)
        # Reference 2: autodiff through a long unrolled fixed-point iteration.
        long = SolverConfig(solver="fixed_point", max_iter=300, tol=0.0)
        unrolled = lambda w, x: jnp.sum(
            c * fixed_point(_tanh_map, w, x, jnp.zeros_like(x), forward=long, grad="unrolled")[0]
        )
        uw, ux = jax.jit(jax.grad(unrolled, argnums=(0, 1)))(w, x)
        np.testing.assert_allclose(gw, uw, atol=1e-9)
        np.testing.assert_allclose(gx, ux, atol=1e-9)


def test_phantom_and_one_step_gradients_match_their_definitions():
    with jax.enable_x64(True):
        w, x, c = _tanh_problem(5)
        fwd = SolverConfig(max_iter=100, tol=1e-12)
        z_star, _ = solve(lambda z: _tanh_map(w, x, z), jnp.zeros_like(x), fwd)
        for k, tau in [(1, 1.0), (3, 0.5)]:

            def by_definition(w, k=k, tau=tau):
                z = z_star  # a constant: no gradient through the solver
                for _ in range(k):
                    z = tau * _tanh_map(w, x, z) + (1 - tau) * z
                return jnp.sum(c * z)

            def phantom(w, k=k, tau=tau):
                z, _ = fixed_point(
                    _tanh_map,
                    w,
                    x,
                    jnp.zeros_like(x),
                    forward=fwd,
                    grad="phantom",
                    phantom_steps=k,
                    phantom_tau=tau,
                )
                return jnp.sum(c * z)

            np.testing.assert_allclose(
                jax.jit(jax.grad(phantom))(w), jax.jit(jax.grad(by_definition))(w), atol=1e-12
            )
        one_step = lambda w: jnp.sum(
            c * fixed_point(_tanh_map, w, x, jnp.zeros_like(x), forward=fwd, grad="one_step")[0]
        )
        expected = jax.grad(lambda w: jnp.sum(c * _tanh_map(w, x, z_star)))(w)
        np.testing.assert_allclose(jax.grad(one_step)(w), expected, atol=1e-12)
        # The 1-step gradient is an approximation: it differs from the exact (IFT) one here.
        ift = lambda w: jnp.sum(c * fixed_point(_tanh_map, w, x, jnp.zeros_like(x), forward=fwd)[0])
        assert float(jnp.max(jnp.abs(jax.grad(ift)(w) - expected))) > 1e-3


def test_fixed_point_under_jit_and_vmap():
    w, x, c = _tanh_problem(6)
    w, x, c = (v.astype(jnp.float32) for v in (w, x, c))
    xs = jnp.stack([x, 2.0 * x, -x])  # three independent problems

    def loss(w, x):
        z, stats = fixed_point(_tanh_map, w, x, jnp.zeros_like(x), forward=SolverConfig(tol=1e-6))
        return jnp.sum(c * z), stats.nstep

    vals, grads = jax.jit(jax.vmap(jax.value_and_grad(loss, has_aux=True), in_axes=(None, 0)))(w, xs)
    single = jax.jit(jax.value_and_grad(loss, has_aux=True))
    for i in range(3):
        (v, _), g = single(w, xs[i])
        np.testing.assert_allclose(vals[0][i], v, rtol=1e-5)
        np.testing.assert_allclose(grads[i], g, rtol=1e-4, atol=1e-5)


def test_adjoint_solve_solves_the_linear_system():
    with jax.enable_x64(True):
        w, x, c = _tanh_problem(7)
        z, _ = solve(lambda z: _tanh_map(w, x, z), jnp.zeros_like(x), SolverConfig(tol=1e-12, max_iter=100))
        u, stats, _ = adjoint_solve(_tanh_map, w, x, z, c, SolverConfig(tol=1e-12, max_iter=100))
        # (I - J)^T u = c per sample, with J the exact per-sample Jacobian.
        for i in range(B):
            jac = jax.jacobian(lambda zi, i=i: _tanh_map(w, x[i], zi))(z[i])
            np.testing.assert_allclose((jnp.eye(D) - jac).T @ u[i], c[i], atol=1e-10)
        assert bool(jnp.all(stats.converged))


def test_jacobian_penalty_is_an_unbiased_frobenius_estimate():
    rng = np.random.default_rng(8)
    a = jnp.asarray(rng.normal(size=(D, D)), jnp.float32)
    f = lambda a, x, z: z @ a.T + x
    z = jnp.zeros((B, D))
    exact = float(jnp.sum(a**2)) / D  # ||J_b||_F^2 / d, the same for every sample
    est = jacobian_penalty(f, a, z, z, jax.random.key(0), num_vectors=2000)
    np.testing.assert_allclose(est, exact, rtol=0.05)
    # Differentiable in the parameters: d/dA E||v^T A||^2 / d = 2 A / d.
    g = jax.grad(lambda a: jacobian_penalty(f, a, z, z, jax.random.key(1), num_vectors=2000))(a)
    np.testing.assert_allclose(g, 2 * a / D, atol=0.15 * float(jnp.abs(2 * a / D).max()))


def test_fixed_point_residual_loss():
    w, x, _ = _tanh_problem(9)
    z, _ = solve(lambda z: _tanh_map(w, x, z), jnp.zeros_like(x), SolverConfig(tol=1e-7, max_iter=100))
    assert float(fixed_point_residual_loss(_tanh_map, w, x, z)) < 1e-10
    z1 = jnp.ones_like(x)
    assert float(fixed_point_residual_loss(_tanh_map, w, x, z1)) > 0.1
    g = jax.grad(lambda w: fixed_point_residual_loss(_tanh_map, w, x, z1))(w)
    assert float(jnp.abs(g).sum()) > 0


def test_bad_configs_fail_loudly():
    for bad in [
        dict(solver="newton"),
        dict(stop_mode="max"),
        dict(max_iter=0),
        dict(tau=0.0),
        dict(memory=0),
        dict(protect_thres=1.0),
    ]:
        with pytest.raises(ValueError):
            SolverConfig(**bad)
    with pytest.raises(ValueError, match="grad mode"):
        fixed_point(_tanh_map, jnp.eye(2), jnp.ones((1, 2)), jnp.zeros((1, 2)), grad="adjoint")
    # A backward solve of one evaluation could only return its start u = 0 (on main: silently).
    with pytest.raises(ValueError, match="max_iter >= 2"):
        adjoint_solve(
            _tanh_map,
            jnp.eye(2),
            jnp.ones((1, 2)),
            jnp.zeros((1, 2)),
            jnp.ones((1, 2)),
            SolverConfig(max_iter=1),
        )


def test_ift_gradient_is_never_exactly_zero():
    # 1. A loss scaled by 1e-7 with the default solvers (float32): the cotangent is below the
    # backward tol, so on main the adjoint solve returned its start u = 0 (gradient exactly 0).
    w, x, c = (v.astype(jnp.float32) for v in _tanh_problem())

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def grad(w, scale, stop_mode):
        backward = SolverConfig(tol=1e-6, stop_mode=stop_mode)  # BACKWARD_DEFAULT for 'abs'
        loss = lambda w: (
            scale * jnp.sum(c * fixed_point(_tanh_map, w, x, jnp.zeros_like(x), backward=backward)[0])
        )
        return jax.grad(loss)(w)

    assert bool(jnp.all(grad(w, 1e-7, "abs") != 0))
    # The abs tolerance is absolute (as torchdeq's); stop_mode='rel' is scale-free.
    np.testing.assert_allclose(grad(w, 1e-7, "rel") / 1e-7, grad(w, 1.0, "rel"), rtol=1e-4, atol=1e-5)
    # 2. W = 1.5 I: Broyden solves the forward; plain iteration diverges on the adjoint. On main
    # that returned u = 0; now the best iterate is returned and the failure is in the stats.
    w, x = 1.5 * jnp.eye(2), jnp.ones((1, 2))
    lin = lambda w, x, z: z @ w.T + x

    @functools.partial(jax.jit, static_argnums=1)
    def grad_lin(w, solver):
        forward, backward = SolverConfig(solver="broyden"), SolverConfig(solver=solver)
        loss = lambda w: jnp.sum(
            fixed_point(lin, w, x, jnp.zeros_like(x), forward=forward, backward=backward)[0]
        )
        return jax.grad(loss)(w)

    np.testing.assert_allclose(grad_lin(w, "broyden"), jnp.full((2, 2), 4.0), rtol=1e-5)
    assert bool(jnp.all(grad_lin(w, "fixed_point") != 0))
    z = jnp.full((1, 2), -2.0)
    _, stats, _ = adjoint_solve(lin, w, x, z, jnp.ones_like(z), SolverConfig(solver="fixed_point"))
    assert bool(jnp.all(stats.diverged)) and not bool(jnp.any(stats.converged))


def test_ift_supports_forward_mode_and_higher_derivatives():
    # On main: jacfwd raised a custom_vjp error and grad(grad) a while-loop error.
    with jax.enable_x64(True):
        w, x, c = _tanh_problem(12)
        fwd, bwd = SolverConfig(max_iter=200, tol=1e-13), SolverConfig(max_iter=300, tol=1e-13)

        def loss(w):
            z, _ = fixed_point(_tanh_map, w, x, jnp.zeros_like(x), forward=fwd, backward=bwd)
            return jnp.sum(c * jnp.sin(z))

        grad = jax.jit(jax.grad(loss))
        np.testing.assert_allclose(jax.jit(jax.jacfwd(loss))(w), grad(w), atol=1e-11)
        # Hessian-vector product (reverse over reverse) against finite differences of the grad.
        d = jnp.asarray(np.random.default_rng(13).normal(size=w.shape))
        hvp = jax.jit(jax.grad(lambda w: jnp.vdot(grad(w), d)))(w)
        eps = 1e-5
        np.testing.assert_allclose(hvp, (grad(w + eps * d) - grad(w - eps * d)) / (2 * eps), atol=1e-8)
        # Forward over reverse gives the same.
        _, hvp_fwd = jax.jvp(grad, (w,), (d,))
        np.testing.assert_allclose(hvp_fwd, hvp, atol=1e-10)
