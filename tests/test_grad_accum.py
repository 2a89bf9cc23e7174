"""Gradient accumulation: a step over ``grad_accum_steps`` micro-batches equals the large-batch step.

The micro-batches partition the batch and their gradients and metrics are averaged, so the new
state equals the one-pass step up to float summation order, on 1 device and on 2 or 4 fake CPU
devices (``tests/conftest.py``), where the micro-batches must also stay on the devices holding
their rows (no all-gather in the compiled step).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from train_utils import ProbeModel, assert_trees_equal, load_config, read_params

from wtjax.job import config as cs
from wtjax.job import metrics, optim, parallel, steps
from wtjax.job.train import train_and_evaluate

RTOL, ATOL = 1e-5, 1e-7
ROWS = 16  # divisible by 4 micro-batches x 4 devices
COLLECTIVES_THAT_MOVE_DATA = ("all-gather(", "all-to-all(", "collective-permute(")


def one_step(model, accum: int, devices: int, config):
    """The state and metrics after one jitted train step on a fixed batch of ``ROWS`` examples."""
    tx, schedule = optim.create_optimizer(config.optim, 4, 8)
    key = jax.random.PRNGKey(0)
    mesh = parallel.create_mesh(devices)
    rep = parallel.replicated(mesh)
    state = jax.jit(steps.make_init_state(model, tx, (8, 8, 3), key), out_shardings=rep)()
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(ROWS, 8, 8, 3)).astype(np.float32),
        "label": (np.arange(ROWS) % 4).astype(np.int32),
    }
    batch = parallel.global_batch(batch, mesh)
    step = steps.make_train_step(model, tx, schedule, key, grad_accum_steps=accum, batch_shards=devices)
    compiled = parallel.jit_train_step(step, mesh).lower(state, batch).compile()
    hlo = compiled.as_text()
    assert not [c for c in COLLECTIVES_THAT_MOVE_DATA if c in hlo], "micro-batches moved between devices"
    new_state, (step_metrics, finite) = compiled(state, batch)
    assert bool(finite)
    return jax.device_get(new_state), jax.device_get(step_metrics)


@pytest.fixture(scope="module")
def tiny_config():
    return load_config("tiny", None)


@pytest.fixture(scope="module")
def tiny_reference(tiny_config):
    return one_step(cs.model_from_config(tiny_config.model, 4), 1, 1, tiny_config)


@pytest.mark.parametrize("accum,devices", [(2, 1), (2, 4), (4, 2)])
def test_accumulated_step_equals_the_large_batch_step(accum, devices, tiny_config, tiny_reference):
    model = cs.model_from_config(tiny_config.model, 4)
    state, step_metrics = one_step(model, accum, devices, tiny_config)
    ref_state, ref_metrics = tiny_reference
    assert int(state.step) == 1
    assert_trees_equal(state.params, ref_state.params, rtol=RTOL, atol=ATOL)
    assert_trees_equal(state.opt_state, ref_state.opt_state, rtol=RTOL, atol=ATOL)
    assert step_metrics.keys() == ref_metrics.keys()
    for name, value in ref_metrics.items():  # full-batch values, not the last micro-batch's
        assert step_metrics[name] == pytest.approx(value, rel=1e-5), name


def test_aux_loss_and_model_metrics_are_full_batch_means(tiny_config):
    model = ProbeModel(num_classes=4, aux_weight=0.5)
    ref_state, ref_metrics = one_step(model, 1, 1, tiny_config)
    state, step_metrics = one_step(model, 4, 2, tiny_config)
    assert_trees_equal(state.params, ref_state.params, rtol=RTOL, atol=ATOL)
    assert ref_metrics[metrics.TRAIN_AUX_LOSS] > 0
    for name in (metrics.TRAIN_LOSS, metrics.TRAIN_AUX_LOSS, metrics.TRAIN_ACCURACY, metrics.GRAD_NORM):
        assert step_metrics[name] == pytest.approx(ref_metrics[name], rel=1e-5), name
    assert step_metrics[metrics.MODEL_PREFIX + "seen_step"] == 0.0  # every micro-batch saw step 0


def test_micro_batches_take_a_block_of_every_device():
    batch = {"x": np.arange(16), "y": np.arange(32).reshape(16, 2)}
    micro = jax.device_get(steps.micro_batches(batch, 2, 4))
    # 4 devices hold rows 0-3, 4-7, 8-11, 12-15; micro-batch m takes block m of each device.
    np.testing.assert_array_equal(micro["x"], [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]])
    np.testing.assert_array_equal(micro["y"][1, 0], [4, 5])
    with pytest.raises(ValueError, match="grad_accum_steps=4 x 8 device"):
        steps.micro_batches(batch, 4, 8)


@pytest.mark.parametrize("value", [0, -1, 3, True])
def test_config_rejects_bad_grad_accum_steps(value):
    config = load_config("tiny", None)  # batch_size 8
    with config.unlocked():
        config.grad_accum_steps = value
    with pytest.raises(ValueError, match="grad_accum_steps"):
        cs.validate(config)


def test_job_rejects_a_batch_that_does_not_split_over_accum_and_devices(tmp_path):
    config = load_config("tiny", None, num_devices=4, grad_accum_steps=4, tensorboard=False)  # 8 % 16
    with pytest.raises(ValueError, match="grad_accum_steps 4 x the 4 devices"):
        train_and_evaluate(config, tmp_path)


def test_job_with_accumulation_reaches_the_same_parameters(tmp_path):
    common = {"tensorboard": False}
    one = train_and_evaluate(load_config("tiny", None, num_devices=1, **common), tmp_path / "one")
    accum = train_and_evaluate(
        load_config("tiny", None, num_devices=2, grad_accum_steps=2, **common), tmp_path / "accum"
    )
    assert accum["step"] == one["step"] == 4
    assert_trees_equal(read_params(tmp_path / "accum"), read_params(tmp_path / "one"), rtol=2e-4, atol=2e-5)
    assert accum[metrics.TRAIN_LOSS] == pytest.approx(one[metrics.TRAIN_LOSS], rel=1e-4)
