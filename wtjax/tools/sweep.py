r"""Studies as data: resumable sweeps of training-job runs, their results, and aggregation.

A *study* is a folder holding ``study.py`` with two functions:

* ``runs(scale) -> list[Run]``: the sweep, as data. A :class:`Run` is exactly a
  ``python -m wtjax.main`` command (config file, config argument, ``--config.*`` overrides).
  ``scale`` names a setting of the study (``'cpu'``: what a small CPU machine affords;
  ``'paper'``: the paper's widths, data and epochs).
* ``aggregate(results, out_dir, scale)``: turns the finished runs' results (dicts, see
  :func:`collect`) into a markdown table and plots in ``out_dir``.

Commands (several studies may share runs: a run is identified by its ``id`` and done once), run
from the directory the runs' config paths are relative to (for this repository's studies, its
root, which also makes the ``experiments`` package they import importable)::

    python -m wtjax.tools.sweep list experiments/fig5_multi_vs_same               # runs and exact commands
    python -m wtjax.tools.sweep run experiments/fig5_multi_vs_same --shard=0/2    # half of the runs
    python -m wtjax.tools.sweep aggregate experiments/fig5_multi_vs_same          # table + plots

Each run trains in its own workdir ``<root>/<scale>/<id>`` (``--root``, default ``./runs/studies``)
with :func:`wtjax.job.train.train_and_evaluate`, so an interrupted run resumes from its last
checkpoint and a finished one (``summary.json`` in its workdir) is skipped. The workdir is locked
while its run trains (:mod:`wtjax.job.workdir_lock`): several ``sweep run`` processes, on one host
or on hosts sharing the root over NFS, share one list of runs, each run trained once. Its result (the run
definition, the job's summary, the eval curve and the median step time) is then written to
``<results>/<scale>/<id>.json`` (``--results``, default ``./experiments/results``); these small
files are what gets committed and aggregated, the workdirs (checkpoints) stay local. The
functions take both directories explicitly; only the command has defaults, relative to the
current directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shlex
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from wtjax.job import workdir_lock

# The command's defaults, relative to the current directory (the repository root for its studies).
CLI_ROOT = "runs/studies"
CLI_RESULTS = "experiments/results"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training-job run: ``python -m wtjax.main --config=<config>:<arg> --config.<k>=<v>...``.

    Attributes:
      id: unique name; also the workdir and result file name. Runs with equal ids must be equal.
      config: config file path; a relative one is relative to the current directory, as in the
        equivalent shell command (this repository's studies name ``configs/...`` from its root).
      arg: the config argument (``k=v,k=v``; see each config's ARGS).
      overrides: ``{'data.train_subset': 10000, ...}``: dotted config paths and values.
      tags: free-form labels the aggregator groups by (e.g. ``{'mode': 'multi', 'depth': 8}``).
    """

    id: str
    config: str
    arg: str = ""
    overrides: dict = dataclasses.field(default_factory=dict)
    tags: dict = dataclasses.field(default_factory=dict)

    def command(self, workdir: str | Path) -> str:
        """The equivalent shell command of the training job."""
        spec = f"{self.config}:{self.arg}" if self.arg else self.config
        parts = ["python -m wtjax.main", f"--config={spec}"]
        parts += [f"--config.{k}={_flag_value(v)}" for k, v in self.overrides.items()]
        parts.append(f"--workdir={workdir}")
        return " ".join(parts)


def _flag_value(v: Any) -> str:
    if isinstance(v, (tuple, list)):  # a Python literal for config_flags, quoted for the shell
        return '"' + repr(tuple(v)) + '"'
    return shlex.quote(str(v))


def load_config(run: Run):
    """The run's locked ConfigDict: ``get_config(arg)`` of its file plus the overrides.

    Raises:
      KeyError/AttributeError: an override names a field the config does not have.
    """
    from wtjax.job import config as config_schema

    config = config_schema.load_config_file(run.config, run.arg)
    config.lock()  # an override of an unknown field fails instead of adding it
    for dotted, value in run.overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"run {run.id}: unknown config field {dotted!r}")
        node[leaf] = value
    return config


def load_study(study_dir: str | Path):
    """Imports ``<study_dir>/study.py`` as a module.

    The study imports what it shares with other studies as ordinary modules (this repository's
    studies import the ``experiments`` package, importable from the repository root).
    """
    path = Path(study_dir) / "study.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a study folder holds study.py with runs() and aggregate()"
        )
    spec = importlib.util.spec_from_file_location(f"_wtjax_study_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def study_runs(study_dirs: Iterable[str | Path], scale: str) -> list[Run]:
    """The runs of several studies, each id once (shared runs must be defined identically).

    Ordered seed by seed (stable otherwise), so a sweep cut short has every configuration at
    its first seeds rather than some configurations at all seeds.
    """
    seen: dict[str, Run] = {}
    for d in study_dirs:
        for run in load_study(d).runs(scale):
            if run.id in seen and _definition(seen[run.id]) != _definition(run):
                raise ValueError(f"two different runs share the id {run.id!r}: {seen[run.id]} vs {run}")
            seen.setdefault(run.id, run)
    return sorted(seen.values(), key=lambda r: r.tags.get("seed", 0))


def _definition(run: Run) -> tuple:
    return (run.config, run.arg, tuple(sorted(run.overrides.items())))


def result_path(results_dir: str | Path, scale: str, run: Run) -> Path:
    """Where the result of ``run`` at ``scale`` is written."""
    return Path(results_dir) / scale / f"{run.id}.json"


def collect(run: Run, workdir: str | Path) -> dict:
    """A finished run's result: definition, the job's summary, eval curve, median step time."""
    from wtjax.job import metrics

    workdir = Path(workdir)
    summary = json.loads((workdir / "summary.json").read_text())
    records = metrics.read_jsonl(workdir / "metrics.jsonl")
    curve = [(s, r[metrics.EVAL_ACCURACY]) for s, r in sorted(records.items()) if metrics.EVAL_ACCURACY in r]
    step_times = [r[metrics.STEP_TIME] for r in records.values() if metrics.STEP_TIME in r]
    return {
        "id": run.id,
        "config": run.config,
        "arg": run.arg,
        "overrides": run.overrides,
        "tags": run.tags,
        "workdir": str(workdir),
        "summary": summary,
        "eval_curve": curve,
        "median_step_time_s": statistics.median(step_times) if step_times else None,
    }


def execute(
    runs: Sequence[Run],
    *,
    scale: str,
    root: str | Path,
    results_dir: str | Path,
    shard: tuple[int, int] = (0, 1),
    limit: int | None = None,
    train_fn: Callable | None = None,
) -> list[str]:
    """Trains every unfinished run of this shard in turn; returns the ids run now.

    Each run trains in ``<root>/<scale>/<id>`` and its result goes to ``<results_dir>/<scale>/<id>.json``.

    A run is finished when its result file exists. A run whose workdir has ``summary.json`` but
    no result file (killed between the two) is only collected, not retrained. A run that raises
    is reported and skipped; the others still run, then ``RuntimeError`` names the failures.
    """
    if train_fn is None:
        from wtjax.job.train import train_and_evaluate as train_fn
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
    mine = [r for i, r in enumerate(runs) if i % count == index]
    todo = [r for r in mine if not result_path(results_dir, scale, r).exists()]
    if limit is not None:
        todo = todo[:limit]
    print(f"sweep: {len(mine)} runs in shard {index}/{count}, {len(todo)} to do", flush=True)
    done, failed, t_sweep = [], [], time.perf_counter()
    for n, run in enumerate(todo, 1):
        workdir = workdir_lock.local_workdir(root) / scale / run.id
        out = result_path(results_dir, scale, run)
        lock = _claim(workdir)
        if lock is None:
            continue  # being trained by another sweep process
        with lock:  # held while training: the job's own lock on the workdir re-enters it
            if out.exists():
                continue  # finished by another sweep process meanwhile
            t0 = time.perf_counter()
            print(f"[{n}/{len(todo)}] {run.id}\n  {run.command(workdir)}", flush=True)
            try:
                result = _train_and_collect(run, workdir, out, train_fn)
            except Exception:  # one broken run (e.g. a NaN) must not stop the sweep: report it at the end
                traceback.print_exc()
                failed.append(run.id)
                continue
        done.append(run.id)
        acc, now = result["summary"].get("eval/accuracy"), time.perf_counter()
        eta = (now - t_sweep) / len(done) * (len(todo) - n)  # each run has its own progress bar
        print(
            f"[{n}/{len(todo)}] {run.id}: eval accuracy {acc}, {now - t0:.0f} s; sweep ETA {eta:.0f} s",
            flush=True,
        )
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed (tracebacks above; rerun to retry): {failed}")
    return done


def _train_and_collect(run: Run, workdir: Path, out: Path, train_fn: Callable) -> dict:
    """Train ``run`` unless its workdir has ``summary.json``; write and return its result."""
    if not (workdir / "summary.json").exists():
        train_fn(load_config(run), str(workdir))
    result = collect(run, workdir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    tmp.rename(out)  # atomic: a killed sweep leaves no partial result
    return result


LOCK = workdir_lock.LOCK_FILE


def _claim(workdir: Path) -> workdir_lock.WorkdirLock | None:
    """The run's workdir lock (:mod:`wtjax.job.workdir_lock`), or ``None`` if a live process holds it.

    Several ``sweep run`` processes can then share one list of runs (one per core, or per GPU)
    without training a run twice; exactly one of concurrent claimants wins, and the lock of a
    killed process is free again (the kernel released it).
    """
    return workdir_lock.try_acquire(workdir)


def load_results(runs: Sequence[Run], scale: str, results_dir: str | Path) -> list[dict]:
    """The results of the finished ``runs`` (missing ones are left out, and counted on stdout).

    Each result carries the tags of the given run: a run shared by several studies is tagged by
    each study in its own terms.
    """
    out = []
    for r in runs:
        if (p := result_path(results_dir, scale, r)).exists():
            out.append({**json.loads(p.read_text()), "tags": r.tags})
    if len(out) < len(runs):
        print(f"aggregate: {len(runs) - len(out)} of {len(runs)} runs have no result yet", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m wtjax.tools.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("list", "run", "aggregate"))
    ap.add_argument("studies", nargs="+", help="study folders (each with study.py)")
    ap.add_argument("--scale", default="cpu", help="the studies' setting: cpu (default) or paper")
    ap.add_argument("--root", default=CLI_ROOT, help=f"parent of the run workdirs (default ./{CLI_ROOT})")
    ap.add_argument(
        "--results", default=CLI_RESULTS, help=f"parent of the result files (default ./{CLI_RESULTS})"
    )
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th run starting at i")
    ap.add_argument("--limit", type=int, default=None, help="at most this many new runs")
    args = ap.parse_args(argv)
    runs = study_runs(args.studies, args.scale)
    if args.action == "list":
        for r in runs:
            state = "done" if result_path(args.results, args.scale, r).exists() else "todo"
            print(f"{state}  {r.command(Path(args.root) / args.scale / r.id)}")
    elif args.action == "run":
        i, n = (int(x) for x in args.shard.split("/"))
        execute(
            runs, scale=args.scale, root=args.root, results_dir=args.results, shard=(i, n), limit=args.limit
        )
    else:
        for d in args.studies:
            study = load_study(d)
            out = Path(d) if args.scale == "cpu" else Path(d) / args.scale  # cpu: the committed tables
            out.mkdir(parents=True, exist_ok=True)
            study.aggregate(load_results(study.runs(args.scale), args.scale, args.results), out, args.scale)
            print(f"aggregated {d} -> {out}", flush=True)


if __name__ == "__main__":
    main()
