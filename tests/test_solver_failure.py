"""The job's policy for failed DEQ solves (``config.solver_failure``): log, skip the step, or stop.

A tiny DEQ whose forward solver gets one iteration and a tolerance it cannot reach fails every
solve; a plain tied model has no solver metrics and must compile to the same program whatever the
policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_utils import assert_trees_equal, checkpoint_steps, compilation_cache, load_config

from wtjax.job import config as cs
from wtjax.job import metrics, steps
from wtjax.job.train import train_and_evaluate
from wtjax.models.deq import DEQMLP
from wtjax.models.mlp import MLP

SOLVER = dict(f_solver="fixed_point", b_solver="fixed_point", f_max_iter=1, monitor_backward=False)
FAILING = dict(**SOLVER, f_tol=1e-9)  # one iteration never reaches 1e-9
CONVERGING = dict(**SOLVER, f_tol=1e9)  # ... always reaches 1e9
FAILED, SKIPPED = metrics.SOLVER_FAILED, metrics.SKIPPED_STEPS


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def one_step(model, policy, lower=False):
    """``(state before, state after, step metrics, lowered program text if lower)`` of one train step."""
    tx = optax.adam(1e-2)
    key = jax.random.key(0)
    state = steps.make_init_state(model, tx, (4, 4, 3), key)()
    batch = {"image": jax.random.normal(key, (4, 4, 4, 3)), "label": jnp.array([0, 1, 2, 3])}
    step = jax.jit(
        steps.make_train_step(model, tx, optax.constant_schedule(1e-2), key, solver_failure=policy)
    )
    new_state, (step_metrics, _) = step(state, batch)
    text = step.lower(state, batch).as_text() if lower else None
    return state, new_state, jax.device_get(step_metrics), text


def test_skip_leaves_params_and_optimizer_state_of_a_failed_step_unchanged():
    before, after, m, _ = one_step(DEQMLP(width=8, depth=2, **FAILING), "skip")
    assert m[metrics.MODEL_PREFIX + "deq_fwd_nonconverged"] == 4 and m[FAILED] == 1 and m[SKIPPED] == 1
    assert_trees_equal(after.params, before.params)
    assert_trees_equal(after.opt_state, before.opt_state)
    assert int(after.step) == 1  # the step is consumed: the data schedule goes on


@pytest.mark.parametrize("policy,model", [("log", FAILING), ("skip", CONVERGING)])
def test_log_and_a_converged_solve_train_on(policy, model):
    before, after, m, _ = one_step(DEQMLP(width=8, depth=2, **model), policy)
    assert m[FAILED] == (model is FAILING) and m.get(SKIPPED, 0) == 0
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), after.params, before.params)
    assert max(jax.tree.leaves(moved)) > 0


def test_a_model_without_solver_metrics_compiles_to_the_same_program_under_every_policy():
    model = MLP(width=8, depth=2, mask_mode="multi")
    results = [one_step(model, p, lower=True) for p in steps.SOLVER_FAILURE_POLICIES]
    (_, state, m, text), *others = results
    assert FAILED not in m and SKIPPED not in m
    for _, other_state, other_m, other_text in others:
        assert other_text == text
        assert_trees_equal(other_state, state)
        assert_trees_equal(other_m, m)


def deq_config(policy, **overrides):
    model = cs.model_config("deq_mlp", width=8, depth=2, **FAILING)
    return load_config(
        "tiny", num_devices=1, tensorboard=False, model=model, solver_failure=policy, **overrides
    )


def test_skip_counts_every_skipped_step_in_the_log(tmp_path):
    # A check before the step-3 checkpoint fetches steps 0-2: they still count in the step-4 log.
    config = deq_config("skip", log_every_steps=4, checkpoint_every_steps=3)
    result = train_and_evaluate(config, tmp_path)
    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert records[4][FAILED] == 4 and records[4][SKIPPED] == 4
    assert result[SKIPPED] == 4


def test_stop_raises_at_the_next_flush_naming_the_step_and_metric(tmp_path):
    with pytest.raises(steps.SolverFailed) as info:
        train_and_evaluate(deq_config("stop"), tmp_path)
    message = str(info.value)
    assert message.startswith("solver failure at step 0: train/model/deq_fwd_nonconverged = 8")
    assert "training step 1 of 4" in message and "Last good (verified) checkpoint: none" in message
    assert "\n" not in message and checkpoint_steps(tmp_path) == []


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="solver_failure must be one of"):
        cs.validate(deq_config("ignore"))
