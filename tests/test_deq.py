"""DEQ models: shared parameter space with the weight-tied models, gradients, MDEQ schedule, health."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wtjax.models import build_model
from wtjax.models.deq import DEQMLP, METRIC_NAMES, DEQResNetLike
from wtjax.models.mlp import MLP
from wtjax.models.resnet_like import ResNetLike

RES = dict(width=4, groups=2, depth=3)
# Where the solver's identity does not matter, plain iteration keeps compile times low.
CHEAP = dict(f_solver="fixed_point", b_solver="fixed_point")


def _images(dtype=jnp.float32, batch=2, size=4):
    return jax.random.normal(jax.random.key(0), (batch, size, size, 3), dtype)


def _loss(model, params, x, y, **kw):
    logits, out = model.apply({"params": params}, x, rngs={"dropout": jax.random.key(3)}, **kw)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + out["aux_loss"], out


@pytest.mark.parametrize(
    "tied,deq",
    [
        (ResNetLike(mask_mode="dense", **RES), DEQResNetLike(**RES, **CHEAP)),
        (MLP(width=8, depth=3, mask_mode="dense"), DEQMLP(width=8, depth=3, **CHEAP)),
    ],
)
def test_tied_checkpoint_loads_into_deq_and_pretraining_is_the_tied_model(tied, deq):
    x = _images()
    tied_params = tied.init(jax.random.key(1), x)["params"]
    deq_params = deq.init(jax.random.key(2), x)["params"]
    assert jax.tree.structure(tied_params) == jax.tree.structure(deq_params)
    assert jax.tree.map(jnp.shape, tied_params) == jax.tree.map(jnp.shape, deq_params)
    # The pretraining phase of the DEQ, run on the tied model's parameters, is the tied model.
    deq = deq.clone(deq_pretrain_steps=10)
    want, _ = tied.apply({"params": tied_params}, x)
    got, out = deq.apply({"params": tied_params}, x, step=3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(out["metrics"]["deq_active"]) == 0.0
    # After pretraining the solver runs and gives a different (converging) answer.
    solved, out = deq.apply({"params": tied_params}, x, step=10)
    assert float(out["metrics"]["deq_active"]) == 1.0 and float(out["metrics"]["deq_fwd_nstep"]) > 1
    assert float(jnp.max(jnp.abs(solved - want))) > 1e-4


def test_deq_mlp_ift_gradient_matches_unrolled_autodiff():
    with jax.enable_x64(True):
        x = _images(jnp.float64)
        y = jnp.array([1, 7])
        # Plain iteration in both directions: the cheapest graphs to compile (this map contracts).
        solver = dict(
            f_solver="fixed_point",
            f_max_iter=150,
            f_tol=1e-13,
            b_solver="fixed_point",
            b_max_iter=150,
            b_tol=1e-13,
        )
        ift = DEQMLP(width=8, depth=3, grad="ift", **solver)
        unrolled = DEQMLP(
            width=8, depth=3, grad="unrolled", f_solver="fixed_point", f_max_iter=150, f_tol=0.0
        )
        params = jax.tree.map(lambda a: a.astype(jnp.float64), ift.init(jax.random.key(1), x)["params"])
        loss = lambda model: jax.jit(lambda p: _loss(model, p, x, y, train=True)[0])
        g_ift = jax.grad(loss(ift))(params)
        g_unr = jax.grad(loss(unrolled))(params)
        for a, b in zip(jax.tree.leaves(g_ift), jax.tree.leaves(g_unr), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-8)
        block = g_ift["tied"]["block"]
        assert float(jnp.abs(block["dense1"]["kernel"]).sum()) > 1e-6  # gradients reach the block


def test_deq_resnet_ift_gradient_matches_unrolled_autodiff():
    # At init this block is a slow, non-smooth contraction (ReLU + GroupNorm): Anderson stalls near
    # residual 0.05 on it, Broyden converges; plain iteration needs a few hundred steps.
    x, y = _images(), jnp.array([2, 5])
    ift = DEQResNetLike(
        **RES, f_solver="broyden", f_max_iter=100, f_tol=1e-6, b_solver="broyden", b_tol=1e-8, b_max_iter=100
    )
    unrolled = DEQResNetLike(**RES, grad="unrolled", f_solver="fixed_point", f_max_iter=400, f_tol=0.0)
    params = ift.init(jax.random.key(1), x)["params"]
    g_ift, out = jax.jit(jax.grad(lambda p: _loss(ift, p, x, y), has_aux=True))(params)
    assert float(out["metrics"]["deq_fwd_nonconverged"]) == 0
    g_unr = jax.jit(jax.grad(lambda p: _loss(unrolled, p, x, y)[0]))(params)
    for a, b in zip(jax.tree.leaves(g_ift), jax.tree.leaves(g_unr), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3 * float(jnp.abs(b).max()) + 1e-7)
    assert float(jnp.abs(g_ift["tied"]["block"]["conv1"]["kernel"]).sum()) > 0


def test_training_steps_switch_from_pretraining_to_solver_with_one_compile():
    # The MLP keeps this cheap; the ResNet's two phases are checked in the first test.
    model = build_model(
        "deq_mlp",
        width=8,
        depth=3,
        deq_pretrain_steps=2,
        f_max_iter=8,
        b_max_iter=8,
        jac_weight=0.5,
        monitor_backward=True,
        **CHEAP,
    )
    x, y = _images(batch=4), jnp.array([0, 1, 2, 3])
    params = model.init(jax.random.key(1), x)["params"]
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(params, opt_state, step):
        (loss, out), grads = jax.value_and_grad(
            lambda p: _loss(model, p, x, y, train=True, step=step), has_aux=True
        )(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, out["metrics"], out["aux_loss"]

    actives = []
    for step in range(4):
        new_params, opt_state, loss, metrics, aux = train_step(params, opt_state, jnp.asarray(step))
        assert np.isfinite(float(loss)) and set(metrics) == set(METRIC_NAMES)
        moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_params, params)
        assert moved["tied"]["block"]["dense1"]["kernel"] > 0
        params = new_params
        actives.append(float(metrics["deq_active"]))
        if step >= 2:
            assert 1 <= float(metrics["deq_fwd_nstep"]) <= 8 and float(metrics["deq_bwd_nstep"]) >= 1
            assert float(metrics["deq_jac_loss"]) > 0
            np.testing.assert_allclose(aux, 0.5 * metrics["deq_jac_loss"], rtol=1e-6)
        else:
            assert float(aux) == 0.0
    assert actives == [0.0, 0.0, 1.0, 1.0]


def test_nonconvergence_is_counted_and_gradients_are_not_zeroed():
    model = DEQMLP(width=8, depth=3, f_tol=1e-9, b_max_iter=2, b_tol=1e-12, monitor_backward=True, **CHEAP)
    x, y = _images(), jnp.array([1, 2])
    params = model.init(jax.random.key(1), x)["params"]
    (_, out), grads = jax.value_and_grad(
        lambda p: _loss(model, p, x, y, train=True, max_iter=2), has_aux=True
    )(params)
    m = out["metrics"]
    assert float(m["deq_fwd_nstep"]) == 2  # the test-time override of the iterations
    assert float(m["deq_fwd_nonconverged"]) == 2 and float(m["deq_bwd_nonconverged"]) == 2
    block = grads["tied"]["block"]["dense1"]["kernel"]
    assert bool(jnp.all(jnp.isfinite(block))) and float(jnp.abs(block).sum()) > 0
    # Evaluation: no regularisers, no backward monitor.
    _, out = model.apply({"params": params}, x)
    assert float(out["aux_loss"]) == 0.0 and float(out["metrics"]["deq_bwd_nstep"]) == 0.0


@pytest.mark.parametrize("grad", ["phantom", "one_step"])
def test_inexact_gradient_modes_train(grad):
    model = DEQMLP(width=8, depth=3, grad=grad, phantom_steps=3, fp_weight=0.1, **CHEAP)
    x, y = _images(), jnp.array([1, 2])
    params = model.init(jax.random.key(1), x)["params"]
    (loss, out), grads = jax.value_and_grad(lambda p: _loss(model, p, x, y, train=True), has_aux=True)(params)
    assert float(out["metrics"]["deq_fp_loss"]) > 0 and np.isfinite(float(loss))
    assert float(jnp.abs(grads["tied"]["block"]["dense2"]["kernel"]).sum()) > 0


def test_bad_fields_fail_loudly():
    with pytest.raises(TypeError):
        build_model("deq_resnet_like", f_tolerance=1e-3)
    with pytest.raises(ValueError, match="grad mode"):
        DEQMLP(width=8, grad="adjoint").init(jax.random.key(0), _images())
    with pytest.raises(ValueError, match="solver"):
        DEQMLP(width=8, f_solver="newton").init(jax.random.key(0), _images())


def test_a_nan_input_row_stays_in_its_row():
    # On main one NaN image stopped the solver at step 1 for the whole batch: every row got
    # z0 = 0, i.e. finite but wrong logits for the clean rows too.
    model = DEQMLP(width=8, depth=3, f_solver="broyden", f_max_iter=30, f_tol=1e-5)
    x = _images(batch=3)
    params = model.init(jax.random.key(1), x)["params"]
    logits, out = model.apply({"params": params}, x.at[1, 0, 0, 0].set(jnp.nan))
    clean = jnp.asarray([0, 2])
    want, out_clean = model.apply({"params": params}, x[clean])
    np.testing.assert_allclose(logits[clean], want, rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(jnp.isnan(logits[1])))
    m, m_clean = out["metrics"], out_clean["metrics"]
    assert float(m["deq_fwd_diverged"]) == 1 and float(m_clean["deq_fwd_diverged"]) == 0
    assert float(m["deq_fwd_nonconverged"]) == 1 + float(m_clean["deq_fwd_nonconverged"])


def test_backward_probe_runs_on_a_few_samples_and_only_for_ift():
    x, y = _images(batch=4), jnp.arange(4)
    kw = dict(width=8, depth=3, f_max_iter=8, b_max_iter=3, b_tol=1e-12, monitor_backward=True, **CHEAP)
    model = DEQMLP(monitor_samples=3, **kw)
    params = model.init(jax.random.key(1), x)["params"]
    (_, out), grads = jax.value_and_grad(lambda p: _loss(model, p, x, y, train=True), has_aux=True)(params)
    m = out["metrics"]
    assert float(m["deq_bwd_nstep"]) == 3 and float(m["deq_bwd_nonconverged"]) == 3  # of 3 probed
    assert float(m["deq_bwd_diverged"]) == 0
    assert float(jnp.abs(grads["tied"]["block"]["dense1"]["kernel"]).sum()) > 0
    # No backward solve to probe with an inexact gradient.
    _, out = _loss(DEQMLP(grad="one_step", **kw), params, x, y, train=True)
    assert float(out["metrics"]["deq_bwd_nstep"]) == 0
    with pytest.raises(ValueError, match="monitor_samples"):
        _loss(DEQMLP(monitor_samples=0, **kw), params, x, y, train=True)
