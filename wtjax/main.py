"""Command-line entry point, intentionally tiny: everything testable lives in :mod:`wtjax.job.train`.

    python -m wtjax.main --config=configs/digits_quickstart.py --workdir=runs/quickstart
    wtjax-train --config=digits_quickstart --workdir=runs/quickstart   # a packaged config, anywhere
    python -m wtjax.main --config=configs/cifar_resnet.py:mask_mode=same,density=0.3 \\
        --config.data.data_dir=path/to/cifar10/train --config.data.holdout=5000

Rerunning the same command resumes from the newest checkpoint in the workdir. A notebook does the
same with ``train.train_and_evaluate(get_config(), workdir)``. On SIGTERM (a preemption notice)
the job saves the step it reached and exits with status 0. A workdir in use by another live job
is refused at once: one line on stderr, status 1. JAX's own flags are accepted as well
(``--jax_platforms=cpu``, ``--jax_log_compiles`` ...).
"""

from __future__ import annotations

import os
import sys

import jax

from wtjax import _extras

_extras.require("train", "the training job (wtjax.main)")  # before absl: name the extra, not one module

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from wtjax.job import config as config_schema  # noqa: E402
from wtjax.job import parallel, preemption, train, workdir_lock  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: path/to/config.py:k=v,k=v", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: ./runs/<config.name>).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # orbax logs every save at INFO; keep the console for the job's own lines.
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config.distributed.num_processes in (None, 1) and not config.distributed.auto:
        # Before JAX runs anything; JAX_NUM_CPU_DEVICES=1 opts out (see use_cpu_cores).
        micro_batch = config.batch_size // config.grad_accum_steps
        parallel.use_cpu_cores((micro_batch, config.eval_batch_size or config.batch_size))
    workdir = _WORKDIR.value or os.path.join("runs", config.name)
    try:
        train.train_and_evaluate(config, workdir)
    except preemption.Preempted:
        # Saved and stopped on a preemption notice (the job printed the checkpoint): a clean stop,
        # exit status 0; rerunning resumes. Unlike a finished run, the workdir has no summary.json.
        return
    except (workdir_lock.WorkdirLocked, workdir_lock.UnsupportedWorkdir) as e:
        raise SystemExit(f"wtjax: {e}") from None  # one line, status 1: nothing ran, nothing to trace


def _with_config_path(argv: list[str]) -> list[str]:
    """``argv`` with a packaged config's name (``--config=cifar_resnet:width=32``) made its path:
    config_flags reads the file at the path it is given."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            name, colon, config_arg = arg.removeprefix("--config=").partition(":")
            try:
                out[i] = f"--config={config_schema.resolve_config(name)}{colon}{config_arg}"
            except FileNotFoundError as e:
                raise SystemExit(f"wtjax: {e}") from None
    return out


def run() -> None:
    """The command: ``python -m wtjax.main`` or ``wtjax-train`` (the console script)."""
    flags.mark_flags_as_required(["config"])
    jax.config.config_with_absl()  # JAX's own flags too, e.g. --jax_platforms=cpu (as Flax's examples)
    app.run(main, argv=_with_config_path(sys.argv))


if __name__ == "__main__":
    run()
