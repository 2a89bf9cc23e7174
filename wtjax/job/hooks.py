"""Training hooks: methods that change what the job trains (LoRA fine-tuning, pruning at init).

A hook acts at two points, and the job knows nothing else about it:

* **init**: :meth:`TrainHook.init_state` transforms the initial :class:`TrainState` before the
  optimizer state is made from its params (LoRA: the params become the trainable adapters + head;
  pruning: the masks are placed in ``state.masks``, so they are checkpointed with the state);
* **every train and eval step**: :meth:`TrainHook.variables` maps the ``apply`` variables
  (``{'params': ...}``, passed from hook to hook in order) to what the model runs with, given the
  state and the hook's frozen step argument (LoRA: the frozen pretrained weights, passed to the
  step rather than closed over, which would embed them in the program as constants).

Why a structural ``typing.Protocol`` in the job layer: the implementations live in
:mod:`wtjax.methods` (:class:`wtjax.methods.pruning.PruningHook`,
:class:`wtjax.methods.lora_finetune.FinetuneHook`), a lower layer that must not import
``wtjax.job``; they implement these methods without inheriting anything, and the protocol states
(and lets a type checker verify) the contract where it is used.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from wtjax.job.state import TrainState
from wtjax.methods import lora_finetune, pruning


@runtime_checkable  # isinstance checks that every method and attribute is there (tests)
class TrainHook(Protocol):
    """What the training job calls on a method that changes what it trains."""

    #: False when ``state.params`` is not the model's parameter tree (LoRA: adapters and head);
    #: the job then skips reports that expect the model's params (parameter/FLOP accounting).
    trains_model_params: bool

    def init_state(self, state: TrainState) -> TrainState:
        """The initial state (``opt_state`` is still ``None``; it is made from the returned params).

        Traced by ``jax.jit``: arrays the hook holds become constants of the init program.
        """

    def frozen(self) -> Any:
        """A pytree passed to every step as an argument (replicated, not checkpointed); ``()``: none."""

    def variables(self, variables: dict, state: TrainState, frozen: Any) -> dict:
        """The ``apply`` variables of one step (traced in the train and eval steps)."""

    def describe(self) -> str:
        """One line for the log."""

    def summary(self) -> dict:
        """Entries added to the job's ``summary.json``."""


def from_config(config, model, dataset, *, params_key, pruning_key, init_variables) -> tuple[tuple, Any]:
    """``(hooks, initial params or None)`` for ``config.lora`` and ``config.pruning``.

    Args:
      config: the job's config.
      model: the model; dataset: the job's dataset (classes, image shape, training batches).
      params_key: key of the model's initial params (and of LoRA's adapters and new head).
      pruning_key: key of the random pruning scores.
      init_variables: ``init_variables() -> the model's initial variables`` (from ``params_key``:
        ``{'params'[, 'batch_stats']}``, :func:`wtjax.job.steps.init_variables`).

    Returns:
      The hooks in the order their :meth:`TrainHook.variables` apply (LoRA's view of the params
      before pruning's masks) and the initial params when a hook computed them (pruning scores
      them), so that the state is initialised from the same arrays instead of a second init.
    """
    hooks, params = [], None
    lora = lora_finetune.FinetuneHook.from_config(config)
    if lora is not None:
        hooks.append(lora.loaded(dataset.num_classes, dataset.image_shape, params_key))
    if config.pruning.method is not None:
        # From the seed, on every (re)start: a resumed job recomputes exactly the masks its
        # checkpoint holds (and reports them), without a separate code path.
        variables = init_variables()
        params = variables["params"]
        batch = next(dataset.train_batches(min(config.pruning.batch_size, dataset.num_train)))
        batch = {"image": batch["image"], "label": batch["label"]}
        masks = pruning.init_masks(
            config.pruning, model, params, batch, pruning_key, batch_stats=variables.get("batch_stats")
        )
        hooks.append(pruning.PruningHook(config.pruning.method, masks))
    return tuple(hooks), params


def apply_variables(hooks, params, state: TrainState, frozen) -> dict:
    """The ``apply`` variables of ``params`` (the differentiated ones) through every hook.

    ``state.batch_stats`` (BatchNorm's running statistics), when set, join them as the
    ``batch_stats`` collection (hooks pass collections they do not map through).
    """
    variables = {"params": params}
    if state.batch_stats is not None:
        variables["batch_stats"] = state.batch_stats
    for hook, hook_frozen in zip(hooks, frozen, strict=True):
        variables = hook.variables(variables, state, hook_frozen)
    return variables
