"""Checkpoint integrity: checksums committed with every step, verified on resume, with fallback."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from train_utils import assert_trees_equal

from wtjax.job import checkpointing, checksums
from wtjax.job.state import TrainState
from wtjax.job.train import _PendingMetrics

SINGLE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _state(step: int) -> TrainState:
    params = {"dense": {"kernel": jnp.full((16, 32), float(step)), "bias": jnp.ones(32)}}
    return TrainState(jnp.asarray(step, jnp.int32), params, optax.adam(1e-3).init(params))


def _abstract():
    return checkpointing.abstract_like(jax.eval_shape(lambda: _state(0)), SINGLE)


def _write(directory, steps, *, async_save=False) -> None:
    checkpointer = checkpointing.Checkpointer(directory, keep=10, async_save=async_save)
    for step in steps:
        checkpointer.save(step, _state(step))
    checkpointer.close()


def _largest_data_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "default").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _garbage(step_dir):
    path = _largest_data_file(step_dir)
    with open(path, "r+b") as f:  # eight bytes in the middle of the data
        f.seek(path.stat().st_size // 2)
        f.write(b"\x7f" * 8)


def _truncate(step_dir):
    path = _largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 3)


def _delete_data(step_dir):
    _largest_data_file(step_dir).unlink()


def _delete_metadata(step_dir):
    (step_dir / "default" / "_METADATA").unlink()


@pytest.mark.parametrize("async_save", [False, True])
def test_every_checkpoint_commits_its_checksums(tmp_path, async_save):
    _write(tmp_path, [1, 2], async_save=async_save)
    for step in (1, 2):
        manifest = json.loads((tmp_path / str(step) / checksums.MANIFEST).read_text())
        assert "default/_METADATA" in manifest["files"]
        assert checksums.verify(tmp_path / str(step)) is None
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name or p.name.endswith(".partial")]
    # orbax's max_to_keep deletes a step's manifest with it (it lives in the step directory).
    checkpointer = checkpointing.Checkpointer(tmp_path, keep=2, async_save=async_save)
    checkpointer.save(3, _state(3))
    checkpointer.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3"]


@pytest.mark.parametrize("damage", [_garbage, _truncate, _delete_data, _delete_metadata])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    _write(tmp_path, [1, 2])
    damage(tmp_path / "2")
    lines = []
    checkpointer = checkpointing.Checkpointer(tmp_path, log=lines.append)
    assert checkpointer.newest_verified_step() == 1
    restored, was_restored = checkpointer.restore_or_init(None, _abstract())
    checkpointer.close()
    assert was_restored and int(restored.step) == 1
    assert_trees_equal(jax.device_get(restored), jax.device_get(_state(1)))
    assert len(lines) == 2, lines  # one line rejecting checkpoint 2, one moving it aside
    assert f"checkpoint {tmp_path / '2'} rejected: " in lines[0] and "trying an older one" in lines[0]
    # Kept for inspection, out of the way of the step the resumed run saves again.
    assert (tmp_path / "rejected" / "2").is_dir() and not (tmp_path / "2").exists()
    checkpointer = checkpointing.Checkpointer(tmp_path, async_save=False)
    checkpointer.save(2, _state(2))
    checkpointer.close()
    assert checksums.verify(tmp_path / "2") is None


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _write(tmp_path, [1, 2])
    _garbage(tmp_path / "1")
    _truncate(tmp_path / "2")
    lines = []
    checkpointer = checkpointing.Checkpointer(tmp_path, log=lines.append)
    with pytest.raises(
        checkpointing.CheckpointError, match=r"none of the 2 checkpoints in .* can be restored"
    ):
        checkpointer.restore_or_init(lambda: pytest.fail("started from the seed"), _abstract())
    assert len(lines) == 2 and (tmp_path / "2").is_dir()  # nothing moved: the user decides


def test_a_checkpoint_without_checksums_is_restored_saying_so(tmp_path):
    """Run directories written before checksums existed still resume (unverified, said once)."""
    manager = ocp.CheckpointManager(tmp_path)
    manager.save(1, args=ocp.args.StandardSave(_state(1).checkpoint_tree()))
    manager.wait_until_finished()
    lines = []
    restored, _ = checkpointing.Checkpointer(tmp_path, log=lines.append).restore_or_init(None, _abstract())
    assert int(restored.step) == 1
    assert lines == [f"checkpoint {tmp_path / '1'}: {checksums.NO_MANIFEST}; restoring it unverified"]


def test_a_changed_model_is_named_as_such_not_as_corruption(tmp_path):
    _write(tmp_path, [1])
    params = {"dense": {"kernel": jnp.zeros((16, 8)), "bias": jnp.zeros(8)}}
    other = TrainState(jnp.asarray(0, jnp.int32), params, optax.adam(1e-3).init(params))
    abstract = checkpointing.abstract_like(jax.eval_shape(lambda: other), SINGLE)
    with pytest.raises(ValueError, match=r"does not match this config's model/optimizer"):
        checkpointing.Checkpointer(tmp_path).restore_or_init(None, abstract)


def test_the_nan_guard_names_a_checkpoint_that_verifies(tmp_path):
    _write(tmp_path, [2, 4])
    _garbage(tmp_path / "4")
    pending = _PendingMetrics(checkpointing.Checkpointer(tmp_path), total_steps=8)
    pending.add(4, {}, np.bool_(False))
    with pytest.raises(FloatingPointError, match=r"Last good \(verified\) checkpoint: .*/2$"):
        pending.flush()
