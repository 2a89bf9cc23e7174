"""Metric names (in one place) and where they are written.

Every metric goes to three places, from process 0 only:

* stdout: one line per log/eval step, plus a progress line between them;
* ``<workdir>/metrics.jsonl``: one JSON object per line, ``{"step": s, "<name>": value, ...}``
  (appended; after a resume the steps between the last checkpoint and the interruption appear
  twice: readers keep the last record of a step, :func:`read_jsonl` does);
* TensorBoard event files in ``<workdir>/tensorboard`` (tensorboardX; optional).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

# Training metrics, averaged over the steps since the previous log step.
TRAIN_LOSS = "train/loss"  # cross-entropy + aux_loss (what is minimised)
TRAIN_XENT = "train/cross_entropy"
TRAIN_AUX_LOSS = "train/aux_loss"  # the model's out['aux_loss'] (e.g. a DEQ Jacobian penalty)
TRAIN_ACCURACY = "train/accuracy"
GRAD_NORM = "train/grad_norm"  # global L2 norm of the gradient
LEARNING_RATE = "train/learning_rate"  # at the last step of the interval
IMAGES_PER_SEC = "train/images_per_sec"  # global images per second of wall time over the interval
STEP_TIME = "train/step_time_s"  # wall seconds per step over the interval
COMPILE_TIME = "train/first_step_s"  # wall seconds of the first step (compilation included)
MODEL_PREFIX = "train/model/"  # + a key of out['metrics'] (e.g. DEQ solver steps/residuals)
# Solver health (config.solver_failure, wtjax/job/steps.py). A key of out['metrics'] ending in one of
# these counts failed solves (> 0: the step's forward or backward solve failed); the DEQ models and
# the implicit solvers' helpers keep to this naming.
SOLVER_FAILURE_SUFFIXES = ("_nonconverged", "_diverged")
SOLVER_FAILED = "train/solver_failed_steps"  # steps of the interval with a failed solve
SKIPPED_STEPS = "train/skipped_steps"  # steps of the interval left out (solver_failure='skip')
COUNTS = (SOLVER_FAILED, SKIPPED_STEPS)  # summed over the interval, not averaged
# Evaluation on the dataset's eval split (test set or holdout; see Dataset.eval_split).
EVAL_LOSS = "eval/loss"
EVAL_ACCURACY = "eval/accuracy"
EVAL_COUNT = "eval/num_examples"
EPOCH = "epoch"


class MetricWriter:
    """Write metric dicts to stdout, ``metrics.jsonl`` and TensorBoard.

    Args:
      workdir: the run directory.
      enabled: False on processes other than 0 (they write nothing).
      tensorboard: also write TensorBoard event files.
    """

    def __init__(self, workdir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: dict[str, float], *, echo: bool = True) -> None:
        """Record ``values`` at ``step`` (floats; non-finite values are written as strings)."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if echo:
            print(f"[step {step}] " + format_values(values), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def format_values(values: dict[str, float]) -> str:
    """``name=value`` pairs, compact (4 significant digits)."""
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


def read_jsonl(path: str | Path) -> dict[int, dict]:
    """``{step: merged record}`` from a ``metrics.jsonl``, later records of a step winning."""
    steps: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            steps.setdefault(record["step"], {}).update(record)
    return steps


class Progress:
    """A progress line (step, rate, ETA) on stdout, at most every ``interval_s`` seconds."""

    def __init__(
        self, total_steps: int, start_step: int = 0, *, enabled: bool = True, interval_s: float = 20.0
    ):
        self.total, self.start, self.enabled, self.interval = total_steps, start_step, enabled, interval_s
        self._t0 = self._last = time.perf_counter()

    def restart(self, step: int) -> None:
        """Measure the rate from ``step`` on (e.g. after the compiling first step)."""
        self.start, self._t0 = step, time.perf_counter()

    def update(self, step: int) -> None:
        now = time.perf_counter()
        if not self.enabled or step <= self.start or now - self._last < self.interval:
            return
        self._last = now
        rate = (step - self.start) / max(now - self._t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        percent = 100 * step / self.total
        line = f"[progress] step {step}/{self.total} ({percent:.0f}%), {rate:.2f} steps/s, ETA {_hms(eta)}"
        print(line, flush=True)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"
