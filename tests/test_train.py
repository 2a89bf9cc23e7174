"""The training job end to end on tiny synthetic runs: outputs, resume, NaN guard, model conventions."""

from __future__ import annotations

import json
import shutil

import jax
import matplotlib.image
import numpy as np
import pytest
from train_utils import (
    ProbeModel,
    assert_trees_equal,
    checkpoint_steps,
    compilation_cache,
    load_config,
    read_params,
)

from wtjax.job import config as cs
from wtjax.job import metrics
from wtjax.job.train import train_and_evaluate
from wtjax.models import MODELS


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def tiny(arg=None, **overrides):
    overrides.setdefault("num_devices", 1)
    overrides.setdefault("tensorboard", False)
    return load_config("tiny", arg, **overrides)


def test_end_to_end_writes_config_metrics_checkpoints_and_summary(tmp_path, capsys):
    config = tiny(**{"tensorboard": True, "plots": True, "eval_every_steps": 2, "progress": True})
    result = train_and_evaluate(config, tmp_path)
    out, err = capsys.readouterr()
    assert "compiling the train step" in out and "[step 4]" in out
    assert "train: 100%" in err and "4/4" in err and "eval" in err  # tqdm bars, with rate and ETA
    assert result["step"] == 4 and checkpoint_steps(tmp_path) == [2, 4]
    assert 0.0 <= result[metrics.EVAL_ACCURACY] <= 1.0 and np.isfinite(result[metrics.EVAL_LOSS])
    assert result[metrics.EVAL_COUNT] == config.data.num_eval  # padding rows are masked out
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["mask"]["density"] == 0.5 and saved["optim"]["name"] == "adam"
    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    for name in (metrics.TRAIN_LOSS, metrics.TRAIN_ACCURACY, metrics.LEARNING_RATE, metrics.IMAGES_PER_SEC):
        assert name in records[2] and name in records[4]
    assert metrics.EVAL_ACCURACY in records[4]
    # The logged rate is the schedule's value at the last step of the interval (index 3).
    assert records[4][metrics.LEARNING_RATE] == pytest.approx(
        0.01 * 0.5 * (1 + np.cos(np.pi * 1 / 2)), rel=1e-5
    )
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 4
    assert any((tmp_path / "tensorboard").iterdir())
    assert metrics.EVAL_ACCURACY in records[2]  # an evaluation inside the loop: curves.png redrawn
    curves = matplotlib.image.imread(tmp_path / "curves.png")
    assert curves.ndim == 3 and curves.shape[1] > curves.shape[0] and curves.std() > 0  # three panels
    # The step is jitted once (assert_max_traces inside the job) and the params really moved.
    init = jax.tree.leaves(read_params(tmp_path, 2))
    final = jax.tree.leaves(read_params(tmp_path, 4))
    assert any(not np.array_equal(a, b) for a, b in zip(init, final, strict=True))


def test_resume_is_bitwise_identical_and_ignores_an_unfinished_save(tmp_path, capsys):
    # Dropout weight masks and augmentation make every step depend on the step's RNG.
    config = tiny("mask_mode=dropout")
    train_and_evaluate(config, tmp_path)
    straight = read_params(tmp_path, 4)
    # Pretend the run died while writing checkpoint 4: only an orbax tmp directory is left.
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    unfinished = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"
    (unfinished / "default").mkdir(parents=True)
    (unfinished / "default" / "partial").write_bytes(b"\0" * 10)
    capsys.readouterr()
    train_and_evaluate(config, tmp_path)  # the same command again
    assert "resumed from checkpoint at step 2" in capsys.readouterr().out
    assert not unfinished.exists()
    assert_trees_equal(read_params(tmp_path, 4), straight)
    # Rerunning a finished run restores step 4 and trains no further.
    assert train_and_evaluate(config, tmp_path)["step"] == 4


@pytest.fixture
def probe_model(monkeypatch):
    monkeypatch.setitem(MODELS, "probe", ProbeModel)


def probe_config(**model_fields):
    config = tiny()
    with config.unlocked():
        config.model = cs.model_config("probe", **model_fields)
    return config


def test_aux_loss_is_added_and_model_metrics_and_step_are_passed(tmp_path, probe_model):
    result = train_and_evaluate(probe_config(aux_weight=0.5), tmp_path)
    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    for step in (2, 4):
        r = records[step]
        assert r[metrics.TRAIN_AUX_LOSS] > 0
        assert r[metrics.TRAIN_LOSS] == pytest.approx(
            r[metrics.TRAIN_XENT] + r[metrics.TRAIN_AUX_LOSS], rel=1e-5
        )
        # The model saw steps step-2 and step-1 in this interval: their mean.
        assert r[metrics.MODEL_PREFIX + "seen_step"] == pytest.approx(step - 1.5)
    assert result[metrics.MODEL_PREFIX + "seen_step"] == pytest.approx(2.5)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, probe_model):
    config = probe_config(nan_from_step=4)  # the 5th update (index 4) is NaN
    with config.unlocked():
        config.num_train_steps = 8
        config.log_every_steps = 4
    with pytest.raises(FloatingPointError, match=r"training step 5 of 8") as info:
        train_and_evaluate(config, tmp_path)
    assert "checkpoints/4" in str(info.value)
    assert checkpoint_steps(tmp_path) == [2, 4]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(read_params(tmp_path)))


def test_a_failure_after_the_final_save_still_completes_it(tmp_path, monkeypatch):
    from wtjax.job import train

    def failing_final_evaluation(*args, **kwargs):
        raise RuntimeError("final evaluation failed")

    monkeypatch.setattr(train, "_final_summary", failing_final_evaluation)
    with pytest.raises(RuntimeError, match="final evaluation failed"):
        train_and_evaluate(tiny(), tmp_path)
    # Checked at once: the asynchronous final save was waited for, not left as an orbax tmp dir.
    assert checkpoint_steps(tmp_path) == [2, 4]
    assert not [p.name for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]


def test_a_run_shorter_than_one_step_is_an_error(tmp_path):
    config = tiny()
    config.num_train_steps = None
    config.num_epochs = 0.01  # 8 steps per epoch: 0.08 steps
    with pytest.raises(ValueError, match=r"^num_epochs 0.01 is less than one step of the 8 per epoch"):
        train_and_evaluate(config, tmp_path)
    assert checkpoint_steps(tmp_path) == []


def test_jitted_step_traces_once_donates_its_state_and_learns():
    import chex
    import optax

    from wtjax.job import steps

    config = tiny("model=mlp")
    model = cs.model_from_config(config.model, 4)
    tx = optax.adam(1e-2)
    key = jax.random.PRNGKey(0)
    state = jax.jit(steps.make_init_state(model, tx, (8, 8, 3), key))()
    step = jax.jit(
        chex.assert_max_traces(steps.make_train_step(model, tx, optax.constant_schedule(1e-2), key), n=1),
        donate_argnums=0,
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
        "label": np.arange(8, dtype=np.int32) % 4,
    }
    losses = []
    for i in range(4):
        old = state
        state, (m, finite) = step(state, batch)
        assert bool(finite) and int(state.step) == i + 1
        assert all(x.is_deleted() for x in jax.tree.leaves(old.params))  # buffers were donated
        losses.append(float(m[metrics.TRAIN_LOSS]))
    assert losses[-1] < losses[0]  # the same batch four times: the loss must go down
