"""BatchNorm's running statistics in the training job (``TrainState.batch_stats``).

A tiny model normalises its input (stem) and its pooled features (head) with ``nn.BatchNorm``
around a weight-tied block: the statistics live outside the tie, as they must
(:mod:`wtjax.core.tied`). The stem's BatchNorm sees the raw images, so its running statistics
after a step can be computed by hand from the batch.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from train_utils import assert_trees_equal, compilation_cache, load_config

from wtjax.core.tied import Tied
from wtjax.job import config as cs
from wtjax.job import metrics, parallel, steps
from wtjax.job.state import TrainState
from wtjax.job.train import train_and_evaluate
from wtjax.models import MODELS
from wtjax.models.mlp import MLP

MOMENTUM = 0.9
IMAGE_SHAPE = (8, 8, 3)


class _Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, z):
        return nn.relu(nn.Conv(self.width, (3, 3), name="conv")(z))


class BatchNormNet(nn.Module):
    """BatchNorm stem and head around a tied conv block.

    ``extra_collection`` (non-empty): init also makes a variable in that collection (a model
    state the job does not support). ``fail_solves``: reports one failed solve per step, as a DEQ
    that did not converge (the solver-failure policies).
    """

    num_classes: int = 4
    width: int = 4
    depth: int = 2
    extra_collection: str = ""
    fail_solves: bool = False
    scan: bool = True  # accounting counts FLOPs of the unrolled tie (scan=False)

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=MOMENTUM)
        x = norm(name="stem_norm")(images)
        x = nn.relu(nn.Conv(self.width, (3, 3), name="stem_conv")(x))
        x = Tied(_Block(self.width), depth=self.depth, scan=self.scan, name="tie")(x)
        x = norm(name="head_norm")(x.mean(axis=(1, 2)))
        if self.extra_collection:
            self.variable(self.extra_collection, "count", lambda: jnp.zeros((), jnp.int32))
        failed = jnp.asarray(float(self.fail_solves))
        return nn.Dense(self.num_classes, name="head")(x), {"metrics": {"solver_nonconverged": failed}}


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


@pytest.fixture
def bn_model(monkeypatch):
    monkeypatch.setitem(MODELS, "bn_net", BatchNormNet)


def bn_config(**overrides):
    """``configs/tiny.py`` (synthetic 8x8 data, 4 steps, checkpoints at 2 and 4) with ``BatchNormNet``."""
    config = load_config("tiny", None, num_devices=1, tensorboard=False, **overrides)
    with config.unlocked():
        config.model = cs.model_config("bn_net")
    return config


def read_state(workdir, step: int) -> dict:
    """The whole checkpoint tree of ``step`` as numpy arrays."""
    path = Path(workdir).absolute() / "checkpoints" / str(step) / "default"
    return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))


def batch_of(rows: int, seed: int = 0, offsets=None) -> dict:
    """Random images (plus ``offsets[i]`` added to row ``i``) and labels."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(rows, *IMAGE_SHAPE)).astype(np.float32)
    if offsets is not None:
        images += np.asarray(offsets, np.float32)[:, None, None, None]
    return {"image": images, "label": np.arange(rows, dtype=np.int32) % 4}


def step_functions(model, policy="log", grad_accum_steps=1):
    """``(initial state, train_step)`` of ``model`` with Adam, not jitted."""
    tx, key = optax.adam(1e-2), jax.random.PRNGKey(0)
    state = steps.make_init_state(model, tx, IMAGE_SHAPE, key)()
    step = steps.make_train_step(
        model,
        tx,
        optax.constant_schedule(1e-2),
        key,
        grad_accum_steps=grad_accum_steps,
        solver_failure=policy,
    )
    return state, step


def expected_stem_stats(old_mean, old_var, images):
    """Flax's BatchNorm update of the stem's running statistics from one (global) batch."""
    x = np.asarray(images, np.float64)
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))  # biased variance, as flax's
    return MOMENTUM * old_mean + (1 - MOMENTUM) * mean, MOMENTUM * old_var + (1 - MOMENTUM) * var


def eval_loss(model, variables, dataset) -> float:
    """The mean eval-split cross-entropy of ``model`` at ``train=False`` (real rows only)."""
    total, count = 0.0, 0.0
    for batch in dataset.eval_batches(8):
        logits, _ = model.apply(variables, jnp.asarray(batch["image"]), train=False)
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        total += float(jnp.sum(xent * batch["mask"]))
        count += float(np.sum(batch["mask"]))
    return total / count


# ------------------------------------------------------------------------------- the state


def test_init_state_holds_the_models_batch_stats_and_a_plain_model_none():
    state, _ = step_functions(BatchNormNet())
    stats = state.batch_stats
    assert set(stats) == {"stem_norm", "head_norm"}
    np.testing.assert_array_equal(stats["stem_norm"]["mean"], np.zeros(3))
    np.testing.assert_array_equal(stats["stem_norm"]["var"], np.ones(3))
    assert set(state.checkpoint_tree()) == {"step", "params", "opt_state", "batch_stats"}
    assert set(state.params) == {"stem_conv", "tie", "head", "stem_norm", "head_norm"}  # scale, bias
    assert set(state.params["stem_norm"]) == {"scale", "bias"}

    plain_model = MLP(width=8, depth=2, num_classes=4)
    plain = steps.make_init_state(plain_model, optax.sgd(0.1), IMAGE_SHAPE, jax.random.PRNGKey(0))()
    assert plain.batch_stats is None
    # The layout of checkpoints written before the field existed: older run directories resume.
    assert set(plain.checkpoint_tree()) == {"step", "params", "opt_state"}
    assert TrainState.from_checkpoint_tree(plain.checkpoint_tree()) == plain


def test_an_unsupported_collection_is_a_clear_error():
    with pytest.raises(ValueError, match=r"collection\(s\) \['counters'\].*keeps only 'params'"):
        step_functions(BatchNormNet(extra_collection="counters"))


def test_a_hook_with_its_own_params_refuses_a_batchnorm_model():
    class OwnParams:  # as LoRA: the state's params are not the model's
        trains_model_params = False

        def init_state(self, state):
            return state.replace(params={"w": jnp.zeros(2)})

    init = steps.make_init_state(
        BatchNormNet(), optax.sgd(0.1), IMAGE_SHAPE, jax.random.PRNGKey(0), (OwnParams(),)
    )
    with pytest.raises(ValueError, match="OwnParams trains other params.*batch_stats"):
        init()


# --------------------------------------------------------------------------- train steps


def test_train_step_updates_the_statistics_and_eval_reads_them():
    model = BatchNormNet()
    state, step = step_functions(model)
    batch = batch_of(8, offsets=np.linspace(-2, 2, 8))
    new_state, (m, finite) = jax.jit(step)(state, batch)
    assert bool(finite)
    mean, var = expected_stem_stats(0.0, 1.0, batch["image"])
    np.testing.assert_allclose(new_state.batch_stats["stem_norm"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.batch_stats["stem_norm"]["var"], var, rtol=1e-5)
    head = jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()),
        new_state.batch_stats["head_norm"],
        state.batch_stats["head_norm"],
    )
    assert min(jax.tree.leaves(head)) > 0

    # Eval runs at train=False on the state's running statistics.
    eval_batch = {**batch_of(8, seed=1), "mask": np.ones(8, np.float32)}
    out = steps.make_eval_step(model, step=1)(new_state, eval_batch)
    variables = {"params": new_state.params, "batch_stats": new_state.batch_stats}
    logits, _ = model.apply(variables, eval_batch["image"], train=False)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, eval_batch["label"])
    np.testing.assert_allclose(out["loss"], jnp.sum(xent), rtol=1e-5)
    init_stats = {"params": new_state.params, "batch_stats": state.batch_stats}
    init_logits, _ = model.apply(init_stats, eval_batch["image"], train=False)
    train_logits, _ = model.apply(variables, eval_batch["image"], train=True, mutable=["batch_stats"])[0]
    assert not np.allclose(logits, init_logits, atol=1e-3)  # the statistics matter ...
    assert not np.allclose(logits, train_logits, atol=1e-3)  # ... and are not the batch's own


def test_gradient_accumulation_chains_the_statistics_through_the_micro_batches():
    state, step = step_functions(BatchNormNet(), grad_accum_steps=2)
    batch = batch_of(8, offsets=[0.0] * 4 + [3.0] * 4)  # the two micro-batches differ in mean
    new_state, _ = jax.jit(step)(state, batch)
    mean, var = 0.0, 1.0
    for micro in steps.micro_batches(batch, 2)["image"]:  # in order: micro-batch 0, then 1
        mean, var = expected_stem_stats(mean, var, micro)
    np.testing.assert_allclose(new_state.batch_stats["stem_norm"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.batch_stats["stem_norm"]["var"], var, rtol=1e-5)


@pytest.mark.parametrize("policy", ["skip", "log"])
def test_a_skipped_step_keeps_the_old_statistics(policy):
    state, step = step_functions(BatchNormNet(fail_solves=True), policy=policy)
    new_state, (m, _) = jax.jit(step)(state, batch_of(8, offsets=np.full(8, 2.0)))
    assert m[metrics.SOLVER_FAILED] == 1 and int(new_state.step) == 1
    if policy == "skip":
        assert_trees_equal(jax.device_get(new_state.batch_stats), jax.device_get(state.batch_stats))
        assert_trees_equal(jax.device_get(new_state.params), jax.device_get(state.params))
    else:  # the same step kept: the statistics moved
        assert not np.allclose(new_state.batch_stats["stem_norm"]["mean"], 0.0)


def test_overflowing_statistics_make_the_step_non_finite():
    """Images of size 1e20 overflow the stem's running variance (float32) while the normalised
    output, the loss and the gradients stay finite: the step must still report itself non-finite
    (the job then stops before saving it)."""
    state, step = step_functions(BatchNormNet())
    ok, (metrics_ok, finite_ok) = jax.jit(step)(state, batch_of(8))
    huge = batch_of(8)
    huge["image"] = huge["image"] * np.float32(1e20)
    new_state, (step_metrics, finite) = jax.jit(step)(state, huge)
    assert bool(finite_ok) and not bool(finite)
    assert np.isfinite(step_metrics[metrics.TRAIN_LOSS]) and np.isfinite(step_metrics[metrics.GRAD_NORM])
    assert not np.all(np.isfinite(new_state.batch_stats["stem_norm"]["var"]))


def test_data_parallel_statistics_are_over_the_global_batch():
    model = BatchNormNet()
    state, step = step_functions(model)
    # Device d holds rows 2d, 2d+1 (offset 2d): per-device variances would be far below the global one.
    batch = batch_of(8, offsets=np.repeat(2.0 * np.arange(4), 2))
    one, _ = jax.jit(step)(state, batch)
    mesh = parallel.create_mesh(4)
    four, _ = parallel.jit_train_step(step, mesh)(
        jax.device_put(state, parallel.replicated(mesh)), parallel.global_batch(batch, mesh)
    )
    mean, var = expected_stem_stats(0.0, 1.0, batch["image"])
    np.testing.assert_allclose(four.batch_stats["stem_norm"]["var"], var, rtol=1e-5)
    np.testing.assert_allclose(four.batch_stats["stem_norm"]["mean"], mean, rtol=1e-5, atol=1e-6)
    assert_trees_equal(
        jax.device_get(four.batch_stats), jax.device_get(one.batch_stats), rtol=1e-5, atol=1e-6
    )
    assert_trees_equal(jax.device_get(four.params), jax.device_get(one.params), rtol=2e-4, atol=2e-5)


# ------------------------------------------------------------------------------- the job


def test_the_job_trains_the_statistics_evaluates_with_them_and_analyse_loads_them(tmp_path, bn_model):
    from wtjax.data import pipeline
    from wtjax.tools import analyse

    config = bn_config(accounting=True)
    result = train_and_evaluate(config, tmp_path)
    first, last = read_state(tmp_path, 2), read_state(tmp_path, 4)
    assert set(last) == {"step", "params", "opt_state", "batch_stats"}
    for stats in (first["batch_stats"], last["batch_stats"]):  # moved from the init (0, 1) ...
        assert not np.allclose(stats["stem_norm"]["var"], 1.0)
        assert not np.allclose(stats["head_norm"]["mean"], 0.0)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), first["batch_stats"], last["batch_stats"])
    assert all(jax.tree.leaves(changed))  # ... and on, every step
    # The job's evaluation ran on the final running statistics.
    model = BatchNormNet()
    dataset = pipeline.create_dataset(config.data, seed=config.seed)
    trained = {"params": last["params"], "batch_stats": last["batch_stats"]}
    assert result[metrics.EVAL_LOSS] == pytest.approx(eval_loss(model, trained, dataset), rel=1e-5)
    initial = {"params": last["params"], "batch_stats": jax.tree.map(np.asarray, first["batch_stats"])}
    assert result[metrics.EVAL_LOSS] != pytest.approx(eval_loss(model, initial, dataset), rel=1e-3)
    # Accounting counts the trained parameters only (BatchNorm's scale and bias, not its statistics).
    num_params = sum(x.size for x in jax.tree.leaves(last["params"]))
    assert result["num_params"] == num_params
    accounting = json.loads((tmp_path / "summary.json").read_text())["accounting"]
    assert accounting["stored"] == num_params and accounting["flops_per_image"] > 0
    # analyse.load_run applies the checkpoint with its statistics.
    *_, variables, _, step = analyse.load_run(tmp_path)
    assert step == 4
    assert_trees_equal(jax.device_get(variables["batch_stats"]), last["batch_stats"])


def test_resume_restores_the_statistics_and_repeats_the_uninterrupted_run(tmp_path, bn_model):
    config = bn_config()
    train_and_evaluate(config, tmp_path)
    straight = read_state(tmp_path, 4)
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # the run "died" after step 2's checkpoint
    resumed = train_and_evaluate(config, tmp_path)
    assert resumed["step"] == 4
    assert_trees_equal(read_state(tmp_path, 4), straight)  # statistics included, bitwise


def test_pruning_at_init_scores_a_batchnorm_model(tmp_path, bn_model):
    config = bn_config(**{"pruning.method": "snip", "pruning.sparsity": 0.5, "pruning.batch_size": 8})
    result = train_and_evaluate(config, tmp_path)
    assert 0.45 < result["pruned_fraction"]["all"] < 0.55
    state = read_state(tmp_path, 4)
    assert set(state) == {"step", "params", "opt_state", "masks", "batch_stats"}
