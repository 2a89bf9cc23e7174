"""Optimizer and schedules from config: values against their formulas, weight-decay semantics."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wtjax.job import config as cs
from wtjax.job.optim import create_optimizer, create_schedule


def test_cosine_with_warmup_follows_its_formula():
    cfg = cs.optim_config("adam", 0.1, schedule="cosine", warmup_epochs=1.0)
    sched = create_schedule(cfg, total_steps=50, steps_per_epoch=10)
    for step in (0, 5, 10):  # linear warm-up 0 -> 0.1 over 10 steps
        np.testing.assert_allclose(sched(step), 0.1 * step / 10, rtol=1e-6)
    for step in (10, 20, 30, 49, 50):  # cosine over the remaining 40 steps
        t = (step - 10) / 40
        np.testing.assert_allclose(sched(step), 0.1 * 0.5 * (1 + math.cos(math.pi * t)), rtol=1e-5, atol=1e-9)


def test_multistep_decays_at_epoch_boundaries_counted_from_the_start():
    cfg = cs.optim_config(
        "sgd", 0.05, schedule="multistep", boundaries_epochs=(3, 6), decay_factor=0.1, warmup_epochs=1.0
    )
    sched = create_schedule(cfg, total_steps=100, steps_per_epoch=10)
    expected = {10: 0.05, 29: 0.05, 31: 0.005, 59: 0.005, 61: 0.0005, 99: 0.0005}
    for step, lr in expected.items():
        np.testing.assert_allclose(sched(step), lr, rtol=1e-5)
    const = create_schedule(cs.optim_config("adam", 0.3, schedule="constant"), 10, 5)
    assert float(const(0)) == float(const(9)) == pytest.approx(0.3)


def _one_update(cfg, params, grads):
    tx, _ = create_optimizer(cfg, total_steps=10, steps_per_epoch=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)


def test_adam_weight_decay_is_l2_in_the_gradient_and_adamw_is_decoupled():
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    grads = {"w": jnp.array([0.1, 0.3, -0.2])}
    wd, lr = 0.5, 0.01
    got = _one_update(cs.optim_config("adam", lr, schedule="constant", weight_decay=wd), params, grads)
    # PyTorch Adam(weight_decay): Adam applied to g + wd * w.
    l2 = jax.tree.map(lambda g, w: g + wd * w, grads, params)
    ref_tx = optax.adam(lr)
    upd, _ = ref_tx.update(l2, ref_tx.init(params), params)
    np.testing.assert_allclose(got["w"], optax.apply_updates(params, upd)["w"], rtol=1e-6)
    # AdamW: the Adam step on g, then w -= lr * wd * w (differs from the L2 version).
    got_w = _one_update(cs.optim_config("adamw", lr, schedule="constant", weight_decay=wd), params, grads)
    plain = _one_update(cs.optim_config("adam", lr, schedule="constant"), params, grads)
    np.testing.assert_allclose(got_w["w"], plain["w"] - lr * wd * params["w"], rtol=1e-6)
    assert not np.allclose(got_w["w"], got["w"])


def test_sgd_momentum_nesterov_and_l2():
    params = {"w": jnp.array([1.0, -1.0])}
    grads = {"w": jnp.array([0.5, 0.25])}
    cfg = cs.optim_config("sgd", 0.1, schedule="constant", momentum=0.9, nesterov=True, weight_decay=0.01)
    tx, _ = create_optimizer(cfg, 10, 10)
    state = tx.init(params)
    p, v = np.asarray(params["w"]), np.zeros(2)
    for _ in range(3):  # PyTorch SGD(nesterov): v = mu v + g'; step = g' + mu v; g' = g + wd w
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        g = np.asarray(grads["w"]) + 0.01 * p
        v = 0.9 * v + g
        p = p - 0.1 * (g + 0.9 * v)
    np.testing.assert_allclose(params["w"], p, rtol=1e-5)


def test_clipping_and_errors():
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.array([30.0, 40.0])}  # norm 50
    cfg = cs.optim_config("sgd", 1.0, schedule="constant", momentum=0.0, grad_clip_norm=5.0)
    np.testing.assert_allclose(_one_update(cfg, params, grads)["w"], [-3.0, -4.0], rtol=1e-6)
    with pytest.raises(ValueError, match="rmsprop"):
        create_optimizer(cs.optim_config("rmsprop", 0.1), 10, 10)
    with pytest.raises(ValueError, match="linear"):
        create_schedule(cs.optim_config("adam", 0.1, schedule="linear"), 10, 10)
    with pytest.raises(ValueError, match="warm-up"):
        create_schedule(cs.optim_config("adam", 0.1, warmup_epochs=2.0), 10, 10)
