r"""Side-by-side training-step times of a study's models, measured with the training job itself.

The step time a sweep records for each run is comparable only between runs that shared the
machine alike: a background sweep under ``nice`` runs at about half speed while anything else uses
the cores. This benchmark times the study's distinct models together instead: the runs of its
first seed (the seed changes the masks' values, not the program), each run through the training
job (``wtjax.job.train.train_and_evaluate``: the same data pipeline, train step and logging) for
``--steps`` steps on a ``--train_images`` slice, with no evaluation until the end and no
checkpoint until the end. It repeats this for ``--rounds`` rounds, reversing the order of the runs
every other round so that load drift hits every model alike. For each model it keeps the job's
logged step times after the compile step, and their median. Run it on an idle machine (pause a
background sweep with ``kill -STOP``).

    python -m experiments.benchmarks.study_step_times experiments/central_claim_32px --scale=cpu32

Writes ``step_times.json`` into the folder the study's tables of that scale go to (``<study>`` at
the ``cpu`` scale, ``<study>/<scale>`` at another; ``--out`` to change it): per run id its tags, every
logged step time and the median. A study's ``aggregate`` reads it with :func:`load`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from wtjax.job import metrics
from wtjax.tools import sweep

FILE_NAME = "step_times.json"


def first_seed_runs(study, scale: str) -> list[sweep.Run]:
    """The study's runs at ``scale`` that carry its lowest seed: one run per distinct program."""
    runs = study.runs(scale)
    if not runs:
        raise SystemExit(f"the study has no runs at scale {scale!r}")
    seed = min(r.tags["seed"] for r in runs)
    return [r for r in runs if r.tags["seed"] == seed]


def timing_config(run: sweep.Run, steps: int, train_images: int, log_every: int):
    """``run``'s job config cut to ``steps`` steps on ``train_images`` images: no logging beyond the
    step times, no evaluation or checkpoint before the last step (the workdir is thrown away)."""
    config = sweep.load_config(run)
    with config.unlocked():
        config.num_train_steps = steps
        config.log_every_steps = log_every
        config.eval_every_steps = 0
        config.checkpoint_every_steps = 0
        config.keep_checkpoints = 1
        config.accounting = False
        config.progress = False
        config.plots = False
        config.tensorboard = False
        config.data.train_subset = train_images
    return config


def time_run(run: sweep.Run, steps: int, train_images: int, log_every: int) -> list[float]:
    """The job's logged step times (seconds, one per ``log_every`` steps) of ``run``, cut short."""
    from wtjax.job.train import train_and_evaluate

    with tempfile.TemporaryDirectory(prefix="wtjax_step_times_") as workdir:
        train_and_evaluate(timing_config(run, steps, train_images, log_every), workdir)
        records = metrics.read_jsonl(Path(workdir) / "metrics.jsonl")
    return [r[metrics.STEP_TIME] for _, r in sorted(records.items()) if metrics.STEP_TIME in r]


def measure(runs, *, steps: int, rounds: int, train_images: int, log_every: int) -> dict:
    """``{run id: {'tags', 'step_times_s', 'median_s'}}`` over ``rounds`` alternating rounds."""
    times = {r.id: [] for r in runs}
    for n in range(rounds):
        order = runs if n % 2 == 0 else runs[::-1]
        for run in order:
            times[run.id] += time_run(run, steps, train_images, log_every)
            print(f"round {n + 1}/{rounds} {run.id}: median so far {statistics.median(times[run.id]):.3f} s")
    return {
        r.id: {"tags": r.tags, "step_times_s": times[r.id], "median_s": statistics.median(times[r.id])}
        for r in runs
    }


def load(scale_dir: str | Path) -> dict | None:
    """The measurement committed in a study's ``<study>/<scale>`` folder, or None."""
    path = Path(scale_dir) / FILE_NAME
    return json.loads(path.read_text()) if path.exists() else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", help="study folder (with study.py)")
    p.add_argument("--scale", required=True)
    p.add_argument("--steps", type=int, default=200, help="steps per run and round (the first compiles)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train_images", type=int, default=6400, help="images the cut runs train on")
    p.add_argument("--log_every", type=int, default=20, help="steps per logged step time")
    p.add_argument("--out", default=None, help=f"default: {FILE_NAME} beside the study's tables")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    runs = first_seed_runs(sweep.load_study(args.study), args.scale)
    timed = measure(
        runs, steps=args.steps, rounds=args.rounds, train_images=args.train_images, log_every=args.log_every
    )
    out = Path(args.out or sweep.tables_dir(args.study, args.scale) / FILE_NAME)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m experiments.benchmarks.study_step_times " + " ".join(argv),
        "settings": vars(args),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "runs": timed,
    }
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    for run_id, t in timed.items():
        print(f"{run_id}: median {t['median_s']:.3f} s over {len(t['step_times_s'])} intervals")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
