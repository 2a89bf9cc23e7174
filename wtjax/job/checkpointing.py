"""Checkpoints of the training state with orbax: periodic and final saves, restore-or-init.

A :class:`wtjax.job.state.TrainState` is written as the dict ``{'step', 'params', 'opt_state'}``
(plus ``'masks'`` when pruning and ``'batch_stats'`` for a model with BatchNorm;
:meth:`TrainState.checkpoint_tree`). Nothing else is needed to resume
bitwise: the data order and augmentation follow from ``(seed, step)`` and the dropout key of
step ``s`` is ``fold_in(key, s)``.

Interruptions: orbax writes each checkpoint into ``<step>.orbax-checkpoint-tmp-*`` and renames it
to ``<step>`` only once complete, so a run killed mid-save leaves the previous checkpoint intact;
the unfinished directory is ignored and deleted (``cleanup_tmp_directories``) when the manager is
next opened.

Integrity: each step directory holds a checksum manifest written just before orbax's rename
(:mod:`wtjax.job.checksums`); a resume verifies it and falls back, newest first, to the newest
checkpoint that verifies and restores, printing one line per rejected checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from wtjax.job import checksums
from wtjax.job.state import TrainState


class CheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be restored."""


class Checkpointer:
    """Save and restore the training state under ``directory``.

    Args:
      directory: where the numbered step directories go (``<workdir>/checkpoints``).
      keep: how many of the most recent checkpoints to keep.
      every_steps: the periodic save interval (:meth:`should_save`).
      async_save: write in a background thread (the device-to-host copy is done before
        :meth:`save` returns, so the state's buffers may be donated afterwards).
      log: prints a line (rejected checkpoints); the job passes its process-0 printer.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int = 2,
        every_steps: int = 1000,
        async_save: bool = True,
        log: Callable[[str], None] = print,
    ):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.every_steps, self.log = every_steps, log
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            temporary_path_class=checksums.ChecksummedRename,  # every step commits its checksums
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._closed = False

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint (verified or not), or None."""
        return self.manager.latest_step()

    def newest_verified_step(self) -> int | None:
        """The newest checkpoint whose files match their checksums (:mod:`wtjax.job.checksums`)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            if checksums.verify(self.directory / str(step)) is None:
                return step
        return None

    def restore_or_init(
        self, init_fn: Callable[[], TrainState], abstract_state: TrainState
    ) -> tuple[TrainState, bool]:
        """The state to start from, and whether it was restored.

        Resume order:
          1. the newest *complete* checkpoint in ``directory`` whose files match their checksums
             (unfinished tmp directories of a killed save are ignored), restored directly into the
             shardings of ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with
             ``sharding``). A checkpoint that fails its checksums or its restore is rejected with
             one logged line and the next older one is tried; rejected checkpoints are moved to
             ``directory/rejected/<step>`` once an older one restored (kept for inspection, and
             out of the way of the steps the run will save again). A checkpoint without
             checksums (written before they existed) is restored unverified, saying so;
          2. if ``directory`` holds no checkpoint, a fresh state from ``init_fn()``.

        Raises:
          ValueError: a verified checkpoint does not match the state's structure (e.g. the
            config's model changed while reusing a workdir).
          CheckpointError: there are checkpoints but none can be restored.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return init_fn(), False
        target = abstract_state.checkpoint_tree()
        rejected = []
        for step in steps:
            tree = self._restore_checked(step, target)
            if tree is not None:
                self._set_aside(rejected)
                return TrainState.from_checkpoint_tree(tree), True
            rejected.append(step)
        raise CheckpointError(
            f"none of the {len(steps)} checkpoints in {self.directory} can be restored (see above); "
            "move the directory away to start from the seed"
        )

    def _restore_checked(self, step: int, target):
        """The tree of checkpoint ``step`` if it verifies and restores, else None (logged)."""
        path = self.directory / str(step)
        problem = checksums.verify(path)
        if problem == checksums.NO_MANIFEST:
            self.log(f"checkpoint {path}: {problem}; restoring it unverified")
        elif problem is not None:
            self.log(f"checkpoint {path} rejected: {problem}; trying an older one")
            return None
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # whatever the cause: fall back, never stop silently
            first_line = (str(e).splitlines() or [""])[0][:200]
            if problem is None and isinstance(e, (ValueError, KeyError)):
                # Intact files that do not fit this state: the model or optimizer changed.
                raise ValueError(
                    f"checkpoint {path} does not match this config's model/optimizer ({first_line}); "
                    "use a new --workdir or the config the checkpoint was written with"
                ) from None
            self.log(
                f"checkpoint {path} rejected: its restore failed ({type(e).__name__}: {first_line}); "
                "trying an older one"
            )
            return None

    def _set_aside(self, steps: list[int]) -> None:
        """Move rejected checkpoints to ``directory/rejected/`` (process 0) and forget them."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory / "rejected"
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / str(step)
                n = 1
                while target.exists():  # rejected before: keep both
                    target, n = aside / f"{step}.{n}", n + 1
                (self.directory / str(step)).rename(target)
                self.log(f"moved the rejected checkpoint {step} to {target}")
        ocp.multihost.sync_global_processes("wtjax_checkpoints_set_aside")
        self.manager.reload()

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
