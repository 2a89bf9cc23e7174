"""The training state's checkpoint layout and the hook interface (wtjax/job/state.py, hooks.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from train_utils import assert_trees_equal, load_config

from wtjax.job import checkpointing, hooks, steps
from wtjax.job import config as cs
from wtjax.job.state import TrainState
from wtjax.methods import lora_finetune, pruning
from wtjax.methods.lora import LoraSpec

SINGLE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _state(masks=None):
    params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
    return TrainState(jnp.asarray(3, jnp.int32), params, optax.adam(1e-3).init(params), masks)


@pytest.mark.parametrize(
    "masks", [None, {"params": {"dense": {"kernel": jnp.eye(2, 3, dtype=bool)}}, "masks": {}}]
)
def test_checkpoints_keep_the_dict_layout_and_round_trip(tmp_path, masks):
    state = _state(masks)
    checkpointer = checkpointing.Checkpointer(tmp_path, async_save=False)
    checkpointer.save(3, state)
    checkpointer.close()
    raw = ocp.StandardCheckpointer().restore(tmp_path / "3" / "default")
    assert set(raw) == ({"step", "params", "opt_state"} | ({"masks"} if masks else set()))
    abstract = checkpointing.abstract_like(jax.eval_shape(lambda: state), SINGLE)
    restored, was_restored = checkpointing.Checkpointer(tmp_path).restore_or_init(None, abstract)
    assert was_restored and isinstance(restored, TrainState)
    assert_trees_equal(jax.device_get(restored), jax.device_get(state))


def test_a_checkpoint_written_as_a_plain_dict_resumes(tmp_path):
    """Run directories written before TrainState (the state was a dict) still resume."""
    state = _state()
    manager = ocp.CheckpointManager(tmp_path)
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    manager.save(3, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
    abstract = checkpointing.abstract_like(jax.eval_shape(lambda: state), SINGLE)
    restored, _ = checkpointing.Checkpointer(tmp_path).restore_or_init(None, abstract)
    assert_trees_equal(jax.device_get(restored), jax.device_get(state))


class _Recorder:
    """A hook that tags the params it sees (to check the order) and sets its own initial params."""

    trains_model_params = False

    def __init__(self, name, params=None):
        self.name, self.params = name, params

    def init_state(self, state):
        return state if self.params is None else state.replace(params=self.params)

    def frozen(self):
        return jnp.asarray(2.0)

    def variables(self, variables, state, frozen):
        return {
            **variables,
            "seen": variables.get("seen", ()) + (self.name,),
            "params": variables["params"] * frozen,
        }

    def describe(self):
        return self.name

    def summary(self):
        return {self.name: 1}


def test_hooks_apply_in_order_with_their_own_frozen_argument():
    first, second = _Recorder("a"), _Recorder("b")
    out = hooks.apply_variables(
        (first, second), jnp.asarray(1.5), _state(), (jnp.asarray(2.0), jnp.asarray(3.0))
    )
    assert out["seen"] == ("a", "b") and float(out["params"]) == 1.5 * 2.0 * 3.0
    with pytest.raises(ValueError):  # one frozen argument per hook
        hooks.apply_variables((first, second), jnp.asarray(1.5), _state(), (jnp.asarray(2.0),))


def test_a_hooks_initial_params_replace_the_models_and_get_the_optimizer_state():
    model = cs.model_from_config(load_config("tiny", "model=mlp").model, 4)
    tx = optax.adam(1e-3)
    own = {"w": jnp.full((5,), 7.0)}
    state = steps.make_init_state(model, tx, (8, 8, 3), jax.random.PRNGKey(0), (_Recorder("a", own),))()
    assert_trees_equal(state.params, own)
    assert_trees_equal(state.opt_state, tx.init(own))  # made once, from the hook's params
    assert int(state.step) == 0 and state.masks is None
    # Given params (computed once by a hook's set-up) are used instead of a second model.init.
    params = steps.init_params(model, (8, 8, 3), jax.random.PRNGKey(0))
    plain = steps.make_init_state(model, tx, (8, 8, 3), jax.random.PRNGKey(1))(params)
    assert_trees_equal(plain.params, params)


def test_pruning_hook_holds_masks_in_the_state_and_zeroes_pruned_weights():
    kernel_mask = jnp.array([[True, False, True], [False, True, True]])
    stored = {"tied": {"block": {"kernel": jnp.ones((2, 2), bool)}}}
    hook = pruning.PruningHook("snip", {"params": {"dense": {"kernel": kernel_mask}}, "masks": stored})
    state = hook.init_state(_state())
    assert state.masks is hook.masks and hook.frozen() == ()
    variables = hooks.apply_variables((hook,), state.params, state, ((),))
    np.testing.assert_array_equal(
        variables["params"]["dense"]["kernel"], np.where(kernel_mask, state.params["dense"]["kernel"], 0)
    )
    assert variables["masks"] is stored
    assert hook.summary()["pruned_fraction"]["dense/kernel"] == pytest.approx(2 / 6)
    assert "snip" in hook.describe() and hook.trains_model_params
    assert isinstance(hook, hooks.TrainHook)


def test_lora_hook_trains_only_its_tree_and_views_the_frozen_base():
    base = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}, "head": {"kernel": jnp.ones((4, 2))}}
    finetune = lora_finetune.LoraFinetune(LoraSpec(kind="lora", rank=2, targets=r"^dense/kernel$"))
    # Non-zero adapters (B starts at zero), so the view differs from the base.
    trainable = jax.tree.map(jnp.ones_like, finetune.init(jax.random.PRNGKey(0), base))
    hook = lora_finetune.FinetuneHook(finetune, base=base, trainable=trainable)
    assert not hook.trains_model_params and hook.frozen() is base
    assert isinstance(hook, hooks.TrainHook)
    state = hook.init_state(_state())
    assert state.params is trainable
    variables = hooks.apply_variables((hook,), trainable, state, (base,))
    assert_trees_equal(variables["params"], finetune.effective(base, trainable))
    assert not np.allclose(variables["params"]["dense"]["kernel"], base["dense"]["kernel"])
    assert set(variables["params"]) == set(base)
