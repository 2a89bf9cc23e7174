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
    """

    step: jax.Array
    params: Any
    opt_state: Any
    masks: Any = None

    def checkpoint_tree(self) -> dict:
        """``{'step', 'params', 'opt_state'[, 'masks']}``: the layout checkpoints have always had.

        Orbax restores by tree structure, and a ``masks=None`` field would be an extra (empty)
        node: unset fields are left out so older run directories still resume.
        """
        tree = {"step": self.step, "params": self.params, "opt_state": self.opt_state}
        if self.masks is not None:
            tree["masks"] = self.masks
        return tree

    @classmethod
    def from_checkpoint_tree(cls, tree: dict) -> TrainState:
        """The inverse of :meth:`checkpoint_tree`."""
        return cls(**tree)
