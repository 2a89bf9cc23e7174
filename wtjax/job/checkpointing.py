"""Checkpoints of the training state with orbax: periodic and final saves, restore-or-init.

A :class:`wtjax.job.state.TrainState` is written as the dict ``{'step', 'params', 'opt_state'}``
(plus ``'masks'`` when pruning; :meth:`TrainState.checkpoint_tree`). Nothing else is needed to resume
bitwise: the data order and augmentation follow from ``(seed, step)`` and the dropout key of
step ``s`` is ``fold_in(key, s)``.

Interruptions: orbax writes each checkpoint into ``<step>.orbax-checkpoint-tmp-*`` and renames it
to ``<step>`` only once complete, so a run killed mid-save leaves the previous checkpoint intact;
the unfinished directory is ignored and deleted (``cleanup_tmp_directories``) when the manager is
next opened.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from wtjax.job.state import TrainState


class Checkpointer:
    """Save and restore the training state under ``directory``.

    Args:
      directory: where the numbered step directories go (``<workdir>/checkpoints``).
      keep: how many of the most recent checkpoints to keep.
      every_steps: the periodic save interval (:meth:`should_save`).
      async_save: write in a background thread (the device-to-host copy is done before
        :meth:`save` returns, so the state's buffers may be donated afterwards).
    """

    def __init__(
        self, directory: str | Path, *, keep: int = 2, every_steps: int = 1000, async_save: bool = True
    ):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.every_steps = every_steps
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._closed = False

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def restore_or_init(
        self, init_fn: Callable[[], TrainState], abstract_state: TrainState
    ) -> tuple[TrainState, bool]:
        """The state to start from, and whether it was restored.

        Resume order:
          1. the newest *complete* checkpoint in ``directory`` (unfinished tmp directories of a
             killed save are ignored), restored directly into the shardings of
             ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with ``sharding``);
          2. otherwise a fresh state from ``init_fn()`` (parameters from the config's seed).

        Raises:
          ValueError: the checkpoint does not match the state's structure (e.g. the config's
            model changed while reusing a workdir).
        """
        step = self.latest_step()
        if step is None:
            return init_fn(), False
        try:
            target = abstract_state.checkpoint_tree()
            tree = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"checkpoint {self.directory / str(step)} does not match this config's model/optimizer "
                f"({e}); use a new --workdir or the config the checkpoint was written with"
            ) from e
        return TrainState.from_checkpoint_tree(tree), True

    def should_save(self, step: int) -> bool:
        """True at the periodic save steps."""
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: TrainState) -> None:
        """Save ``state`` as checkpoint ``step`` (asynchronously if configured)."""
        self.manager.save(step, args=ocp.args.StandardSave(state.checkpoint_tree()), force=True)

    def close(self) -> None:
        """Wait for pending writes and release the manager (again: nothing to do)."""
        if self._closed:
            return
        self._closed = True
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state, sharding):
    """``jax.ShapeDtypeStruct`` leaves of ``state`` (arrays or shape structs) placed on ``sharding``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
