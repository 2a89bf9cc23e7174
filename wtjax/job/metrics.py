"""Metric names (in one place) and where they are written.

Every metric goes to three places, from process 0 only:

* stdout: one line per log/eval step (stderr: progress bars with rate and ETA, :func:`progress_bar`);
* ``<workdir>/metrics.jsonl``: one JSON object per line, ``{"step": s, "<name>": value, ...}``
  (appended; after a resume the steps between the last checkpoint and the interruption appear
  twice: readers keep the last record of a step, :func:`read_jsonl` does);
* TensorBoard event files in ``<workdir>/tensorboard`` (tensorboardX; optional).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm

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
            tqdm.write(f"[step {step}] " + format_values(values), file=sys.stdout)  # above any bar

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


def progress_bar(total: int, *, initial: int = 0, desc: str, unit: str, enabled: bool = True, **kwargs):
    """A tqdm progress bar (rate and ETA) that works in terminals, log files and notebooks.

    Redrawn at most every 0.5 s in a terminal and every 30 s when stderr is not one (a log file
    then gets a line per 30 s instead of one per update). ``enabled=False`` gives a silent bar.
    """
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        mininterval=0.5 if interactive else 30.0,
        dynamic_ncols=True,
        **kwargs,
    )
