"""Monotone DEQs: the parametrisation, the circular-conv operators, the splitting solvers, the
implicit backward pass and the Flax models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wtjax.implicit import monotone as mon
from wtjax.models import build_model
from wtjax.models.mondeq import matrices

M = 0.2


def _ab(n, seed=0, scale=0.6, shape=None):
    ka, kb = jax.random.split(jax.random.PRNGKey(seed))
    shape = shape or (n, n)
    return scale * jax.random.normal(ka, shape), scale * jax.random.normal(kb, shape)


@pytest.mark.parametrize("parametrization", mon.PARAMETRIZATIONS[:3])
def test_dense_parametrisation_is_strongly_monotone(parametrization):
    for seed in range(3):
        A, B = _ab(7, seed, scale=1.5)
        W = np.asarray(mon.dense_W(A, B, M, parametrization))
        S = np.eye(7) - W
        eig = np.linalg.eigvalsh((S + S.T) / 2)
        assert eig.min() >= M - 1e-5
        # It is a real restriction: W itself has eigenvalues far from I (A^T A is large).
        if parametrization != "no_a":
            assert eig.max() > M + 1.0


def test_spectral_parametrisation_is_strongly_monotone_per_frequency():
    A, B = _ab(4, 1, shape=(3, 3, 4, 4))
    W = np.asarray(mon.spectral_W(A, B, M, 6, 5))
    S = np.eye(4) - W
    herm = (S + np.conj(np.swapaxes(S, -1, -2))) / 2
    assert np.linalg.eigvalsh(herm).min() >= M - 1e-4


def _circular_conv(z, kernel):
    k = kernel.shape[0] // 2
    padded = jnp.pad(z, ((0, 0), (k, k), (k, k), (0, 0)), mode="wrap")
    return jax.lax.conv_general_dilated(
        padded, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_spectral_operators_are_the_circular_conv_and_its_adjoint():
    kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 3, 3))
    z = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 5, 3))
    y = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 5, 3))
    sym = mon.conv_spectrum(kernel, 6, 5)
    np.testing.assert_allclose(mon.matvec(sym, z), _circular_conv(z, kernel), atol=1e-4)
    # <A z, y> = <z, A^T y>: the transpose is the exact adjoint (the circular conv-transpose).
    lhs = jnp.vdot(mon.matvec(sym, z), y)
    rhs = jnp.vdot(z, mon.matvec(sym, y, transpose=True))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4)
    # W from the spectral parametrisation equals the same combination of the circular convs.
    A, B = _ab(3, 4, shape=(3, 3, 3, 3))
    W = mon.spectral_W(A, B, M, 6, 5)
    a = mon.conv_spectrum(A, 6, 5)
    b = mon.conv_spectrum(B, 6, 5)
    expect = (
        (1 - M) * z
        - mon.matvec(a, _circular_conv(z, A), transpose=True)
        + _circular_conv(z, B)
        - mon.matvec(b, z, transpose=True)
    )
    np.testing.assert_allclose(mon.matvec(W, z), expect, atol=1e-4)


def _direct_solution(W, c, z):
    """Solve the linear system of the active set of ``z``: ``z_S = (I - W_SS)^{-1} c_S``, 0 off S."""
    W, c, z = (np.asarray(a, np.float64) for a in (W, c, z))
    out = np.zeros_like(z)
    for i in range(z.shape[0]):
        s = z[i] > 0
        out[i, s] = np.linalg.solve(np.eye(s.sum()) - W[np.ix_(s, s)], c[i, s])
    return out


def test_splitting_solvers_agree_with_a_direct_solve():
    with jax.enable_x64(True):
        A, B = _ab(6, 3)
        A, B = A.astype(jnp.float64), B.astype(jnp.float64)
        W = mon.dense_W(A, B, M)
        c = jax.random.normal(jax.random.PRNGKey(5), (4, 6), jnp.float64)
        L = np.linalg.norm(np.eye(6) - np.asarray(W), 2)
        results = {}
        for method, alpha in (("pr", 1.0), ("fb", M / L**2)):
            cfg = mon.MonotoneConfig(method=method, alpha=alpha, max_iter=20000, tol=1e-13)
            z, stats = mon.splitting_solve(W, c, cfg)
            assert int(stats.iterations) < 20000
            np.testing.assert_allclose(z, jax.nn.relu(mon.matvec(W, z) + c), atol=1e-9)
            np.testing.assert_allclose(z, _direct_solution(W, c, z), atol=1e-8)
            results[method] = z
        np.testing.assert_allclose(results["pr"], results["fb"], atol=1e-8)
        # The solution has both active and inactive units (the relu matters).
        assert 0 < float(jnp.mean(results["pr"] > 0)) < 1


def _fd_check(loss, args, seed=0, eps=1e-6):
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
    loss = jax.jit(loss)
    for i, (a, g) in enumerate(zip(args, grads, strict=True)):
        d = jax.random.normal(jax.random.PRNGKey(seed + i), a.shape, a.dtype)
        plus = [x + eps * d if j == i else x for j, x in enumerate(args)]
        minus = [x - eps * d if j == i else x for j, x in enumerate(args)]
        fd = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(g, d), fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", mon.METHODS)
def test_implicit_gradient_matches_finite_differences_dense(method):
    with jax.enable_x64(True):
        A, B = (x.astype(jnp.float64) for x in _ab(5, 7))
        c = jax.random.normal(jax.random.PRNGKey(8), (3, 5), jnp.float64)
        alpha = 1.0 if method == "pr" else 0.02
        cfg = mon.MonotoneConfig(
            method, alpha, max_iter=20000, tol=1e-13, backward_max_iter=20000, backward_tol=1e-13
        )

        def loss(A, B, c):
            z, _ = mon.equilibrium(mon.dense_W(A, B, M), c, cfg)
            return jnp.sum(jnp.sin(z) * jnp.arange(1.0, 6.0))

        _fd_check(loss, (A, B, c))


def test_implicit_gradient_matches_finite_differences_conv():
    with jax.enable_x64(True):
        A, B = (x.astype(jnp.float64) for x in _ab(3, 9, scale=0.3, shape=(3, 3, 3, 3)))
        c = jax.random.normal(jax.random.PRNGKey(8), (2, 4, 4, 3), jnp.float64)
        cfg = mon.MonotoneConfig(
            "pr", 1.0, max_iter=5000, tol=1e-13, backward_max_iter=5000, backward_tol=1e-13
        )

        def loss(A, B, c):
            z, _ = mon.equilibrium(mon.spectral_W(A, B, M, 4, 4), c, cfg)
            return jnp.sum(jnp.cos(z))

        _fd_check(loss, (A, B, c))


@pytest.mark.parametrize("name,fields", [("mondeq_fc", dict(width=12)), ("mondeq_conv", dict(channels=4))])
def test_models_follow_the_contract(name, fields):
    images = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 1))
    # The conv model is slower to compile: its reduced forms share the code path of "full".
    for parametrization in mon.PARAMETRIZATIONS if name == "mondeq_fc" else ("full", "none"):
        model = (
            build_model(name, num_classes=5, parametrization=parametrization, pool=2, **fields)
            if name == ("mondeq_conv")
            else build_model(name, num_classes=5, parametrization=parametrization, **fields)
        )
        variables = model.init(jax.random.PRNGKey(1), images)
        assert set(variables) == {"params"}
        logits, out = model.apply(variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
        assert logits.shape == (3, 5) and bool(jnp.all(jnp.isfinite(logits)))
        assert set(out["metrics"]) == {
            "mon_fwd_iters",
            "mon_fwd_res",
            "mon_fwd_nonconverged",
            "mon_fwd_diverged",
            "mon_fwd_alpha",
        }
        assert all(jnp.ndim(v) == 0 for v in out["metrics"].values())
        assert 1 <= float(out["metrics"]["mon_fwd_iters"]) <= 50
        present = set(matrices(variables["params"]))
        expected = {"U"} | ({"A"} if parametrization in ("full", "no_b") else set())
        expected |= {"B"} if parametrization in ("full", "no_a") else set()
        assert present == expected
        # Converged solve: the state is a fixed point of the layer.
        if parametrization == "full":
            assert float(out["metrics"]["mon_fwd_res"]) <= model.tol


def test_fb_step_beyond_its_bound_is_adapted_not_blown_up():
    # alpha = 3 x the bound 2m/L^2: on main the iterates grew to overflow while the stats said
    # "converged" (the NaN residual compared False with tol). Now the step falls back to m/L^2.
    A, B = _ab(6, 3, scale=0.3)
    W = mon.dense_W(A, B, 0.5)  # m/L^2 = 0.056: a few hundred fb iterations
    c = jax.random.normal(jax.random.PRNGKey(5), (4, 6))
    S = np.eye(6) - np.asarray(W)
    margin, L = np.linalg.eigvalsh((S + S.T) / 2).min(), np.linalg.norm(S, 2)
    bound = 2 * margin / L**2
    cfg = mon.MonotoneConfig(method="fb", alpha=3 * bound, max_iter=5000, tol=1e-6)
    z, stats = mon.splitting_solve(W, c, cfg)
    np.testing.assert_allclose(stats.alpha, margin / L**2, rtol=1e-4)
    assert int(stats.nonconverged) == 0 and int(stats.diverged) == 0
    z_pr, _ = mon.splitting_solve(W, c, mon.MonotoneConfig(max_iter=5000, tol=1e-7))
    np.testing.assert_allclose(z, z_pr, atol=1e-4)
    # A step inside the bound is used as given.
    _, stats = mon.splitting_solve(W, c, mon.MonotoneConfig(method="fb", alpha=0.5 * bound))
    np.testing.assert_allclose(stats.alpha, 0.5 * bound, rtol=1e-6)
    # The model: fb with alpha = 1, far beyond the bound at init (on main: logits ~1e18, a NaN
    # residual and mon_fwd_nonconverged = 0).
    model = build_model("mondeq_fc", width=12, num_classes=5, m=1.0, solver="fb", alpha=1.0, max_iter=500)
    images = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 1))
    variables = model.init(jax.random.PRNGKey(1), images)
    logits, out = model.apply(variables, images)
    assert float(out["metrics"]["mon_fwd_alpha"]) < 1.0
    assert (
        float(out["metrics"]["mon_fwd_nonconverged"]) == 0
        and float(out["metrics"]["mon_fwd_res"]) <= model.tol
    )
    assert float(jnp.max(jnp.abs(logits))) < 10.0


@pytest.mark.parametrize("method", mon.METHODS)
def test_a_nan_sample_is_counted_and_does_not_stop_the_others(method):
    # On main one NaN row made the batch's max residual NaN, which stopped every row after one
    # iteration and reported the solve as converged.
    A, B = _ab(6, 3, scale=0.3)
    W = mon.dense_W(A, B, 0.5)
    c = jax.random.normal(jax.random.PRNGKey(5), (3, 6))
    cfg = mon.MonotoneConfig(method=method, alpha=1.0 if method == "pr" else 0.05, max_iter=3000, tol=1e-6)
    z, stats = mon.splitting_solve(W, c.at[1, 0].set(jnp.nan), cfg)
    clean, _ = mon.splitting_solve(W, c[jnp.asarray([0, 2])], cfg)
    np.testing.assert_allclose(z[jnp.asarray([0, 2])], clean, atol=1e-6)
    assert bool(jnp.all(jnp.isnan(z[1])))
    assert int(stats.nonconverged) == 1 and int(stats.diverged) == 1 and int(stats.iterations) > 1


def test_models_build_and_train_under_x64():
    # On main the FC model failed under jax_enable_x64 (float64 A, B against a float32 state).
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))  # float32, as the job feeds
    with jax.enable_x64(True):
        for name, fields in (("mondeq_fc", dict(width=6)), ("mondeq_conv", dict(channels=3, pool=2))):
            model = build_model(name, num_classes=3, **fields)
            variables = model.init(jax.random.PRNGKey(1), images)
            assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
            loss = lambda v, model=model: jnp.sum(model.apply(v, images)[0] ** 2)
            grads = jax.grad(loss)(variables)
            assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
