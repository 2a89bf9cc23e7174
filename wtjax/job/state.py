"""The training state: a typed pytree, and the dict layout its checkpoints are written in."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
    """What a training step reads and writes (replicated on every device, checkpointed).

    Attributes:
      step: the number of steps done (int32 scalar).
      params: the trained parameters (the model's, or a hook's trainable tree, e.g. LoRA's
        adapters and head).
      opt_state: the optimizer state of ``params``.
      masks: pruning at initialisation (:class:`wtjax.methods.pruning.PruningHook`):
        ``{'params': partial bool tree, 'masks': stored-masks collection}``; ``None`` otherwise.
      batch_stats: the model's ``batch_stats`` collection (BatchNorm's running mean and variance,
        outside any tie) when its init makes one; updated by every train step, read by eval;
        ``None`` otherwise.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    masks: Any = None
    batch_stats: Any = None

    # Optional fields, written to checkpoints only when set (:meth:`checkpoint_tree`).
    OPTIONAL_FIELDS = ("masks", "batch_stats")

    def checkpoint_tree(self) -> dict:
        """``{'step', 'params', 'opt_state'[, 'masks'][, 'batch_stats']}``.

        Orbax restores by tree structure, and a ``masks=None`` field would be an extra (empty)
        node: unset optional fields are left out, so run directories written before a field
        existed still resume (for a model that does not set it).
        """
        tree = {"step": self.step, "params": self.params, "opt_state": self.opt_state}
        for name in self.OPTIONAL_FIELDS:
            if getattr(self, name) is not None:
                tree[name] = getattr(self, name)
        return tree

    @classmethod
    def from_checkpoint_tree(cls, tree: dict) -> TrainState:
        """The inverse of :meth:`checkpoint_tree`."""
        return cls(**tree)
