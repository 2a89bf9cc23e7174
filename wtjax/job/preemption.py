"""Stop a training run cleanly when the machine is about to go away (preemption).

Cloud TPU VMs, GKE and SLURM announce a preemption with SIGTERM, some seconds before the process
is killed. The training job checks :meth:`PreemptionWatch.reached` after every step; when it is
True the job saves a checkpoint at that step, waits for the write and raises :class:`Preempted`
(``python -m wtjax.main`` turns it into a message and exit status 0). Rerunning the same command
resumes from that checkpoint.

Two mechanisms, because orbax's only works with ``jax.distributed``:

* multi-process (``jax.distributed`` initialised, e.g. a TPU pod): JAX's preemption sync manager
  installs its own SIGTERM handler at ``jax.distributed.initialize()``, tells every process, and
  agrees on one step that all of them reach; ``CheckpointManager.reached_preemption(step)``
  (orbax) is True at that step on every process, so all save the same step together. A Python
  handler here would replace JAX's, so none is installed.
* single process (no ``jax.distributed``): orbax's check is always False. A Python SIGTERM handler
  sets a flag instead (installed on entering the ``with`` block, the previous handler restored on
  exit); Python runs it between bytecodes, so the flag is seen at the next step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

import jax


class Preempted(BaseException):
    """The run stopped at ``step`` because of a preemption notice; its checkpoint is complete.

    A ``BaseException`` (like ``KeyboardInterrupt``): a request to stop the program, which a
    generic ``except Exception`` (e.g. a sweep skipping a failed run) must not swallow.
    """

    def __init__(self, step: int, checkpoint: Path):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(
            f"preempted at step {step}: saved checkpoint {checkpoint}; rerun the same command to resume"
        )


class PreemptionWatch:
    """``with PreemptionWatch(manager.reached_preemption) as watch: ... watch.reached(step)``.

    Args:
      sync_point: orbax's ``CheckpointManager.reached_preemption`` (True on every process at the
        agreed step of a multi-process run; cheap, and always False without ``jax.distributed``).
    """

    def __init__(self, sync_point: Callable[[int], bool]):
        self._sync_point = sync_point
        self._signalled = False
        self._previous = None
        self._installed = False

    def _on_sigterm(self, signum, frame) -> None:
        self._signalled = True

    def __enter__(self) -> PreemptionWatch:
        # signal.signal works only in the main thread; elsewhere only orbax's check remains.
        if not jax.distributed.is_initialized() and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            # None: the previous handler was not set from Python; SIG_DFL is the closest.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def reached(self, step: int) -> bool:
        """Whether to save ``step`` and stop. Call it at every step (the sync protocol needs it)."""
        return self._signalled or self._sync_point(step)
