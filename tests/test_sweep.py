"""The study runner: configs from run definitions, resumable and shareable sweeps, aggregation.

Runs from the repository root (pytest's directory): runs name their configs from there and the
studies import the ``experiments`` package.
"""

from __future__ import annotations

import fcntl
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import hold_lock

from experiments import report
from wtjax.job import config as config_schema
from wtjax.tools import sweep
from wtjax.tools.sweep import Run

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted(p.parent for p in (ROOT / "experiments").glob("*/study.py"))
RESULTS = ROOT / "experiments" / "results"  # the committed results of the CPU scale


@pytest.fixture(autouse=True)
def _from_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # runs name their configs relative to the current directory


def tiny(rid="a", seed=0, **overrides):
    return Run(rid, "configs/tiny.py", f"steps=3,seed={seed}", overrides, {"seed": seed})


def fake_train(calls):
    """A stand-in for the training job: records the call and writes what a finished job leaves."""

    def train(config, workdir):
        calls.append((config.seed, workdir))
        Path(workdir).mkdir(parents=True, exist_ok=True)
        summary = {"eval/accuracy": 0.5 + config.seed / 10, "step": 3, "num_params": 1}
        (Path(workdir) / "summary.json").write_text(json.dumps(summary))
        (Path(workdir) / "metrics.jsonl").write_text(
            json.dumps({"step": 3, "train/step_time_s": 0.25})
            + "\n"
            + json.dumps({"step": 3, "eval/accuracy": 0.5})
        )

    return train


def test_load_config_applies_overrides_and_rejects_unknown_fields():
    config = sweep.load_config(tiny(**{"data.num_train": 32, "optim.learning_rate": 0.5}))
    assert (config.data.num_train, config.optim.learning_rate, config.num_train_steps) == (32, 0.5, 3)
    with pytest.raises((KeyError, AttributeError), match="no_such"):
        sweep.load_config(tiny(**{"data.no_such": 1}))
    cmd = tiny(**{"pruning.include": ("tied/",)}).command("/w")
    assert cmd == (
        "python -m wtjax.main --config=configs/tiny.py:steps=3,seed=0 "
        "--config.pruning.include=\"('tied/',)\" --workdir=/w"
    )


def test_execute_skips_finished_runs_and_collects_results(tmp_path):
    runs = [tiny("a", 0), tiny("b", 1), tiny("c", 2)]
    calls = []
    kw = dict(
        scale="cpu", root=tmp_path / "runs", results_dir=tmp_path / "results", train_fn=fake_train(calls)
    )
    assert sweep.execute(runs, shard=(1, 2), **kw) == ["b"]  # every 2nd run from index 1
    assert sweep.execute(runs, **kw) == ["a", "c"] and len(calls) == 3
    assert sweep.execute(runs, **kw) == [] and len(calls) == 3  # all finished: nothing retrained
    result = json.loads((tmp_path / "results" / "cpu" / "b.json").read_text())
    assert result["summary"]["eval/accuracy"] == 0.6 and result["median_step_time_s"] == 0.25
    assert result["eval_curve"] == [[3, 0.5]] and result["workdir"] == str(tmp_path / "runs" / "cpu" / "b")
    # A job that finished but whose result was lost is collected, not retrained.
    (tmp_path / "results" / "cpu" / "a.json").unlink()
    assert sweep.execute(runs, **kw) == ["a"] and len(calls) == 3
    loaded = sweep.load_results([tiny("a", 0), tiny("z", 9)], "cpu", tmp_path / "results")
    assert [r["id"] for r in loaded] == ["a"]


def test_a_failing_run_is_reported_after_the_others_ran(tmp_path):
    calls = []
    ok = fake_train(calls)

    def train(config, workdir):
        if config.seed == 1:
            raise FloatingPointError("non-finite loss")
        ok(config, workdir)

    kw = dict(scale="cpu", root=tmp_path / "runs", results_dir=tmp_path / "results", train_fn=train)
    with pytest.raises(RuntimeError, match=r"1 run\(s\) failed.*'b'"):
        sweep.execute([tiny("a", 0), tiny("b", 1), tiny("c", 2)], **kw)
    assert [seed for seed, _ in calls] == [0, 2] and not (tmp_path / "results" / "cpu" / "b.json").exists()
    assert lock_is_free(tmp_path / "runs" / "cpu" / "b")


def lock_is_free(workdir) -> bool:
    """Whether nobody, this process included, holds the lock of ``workdir`` (a fresh flock)."""
    with open(workdir / sweep.LOCK) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def test_a_run_locked_by_a_live_process_is_left_to_it_and_a_dead_ones_lock_is_taken(tmp_path):
    calls = []
    kw = dict(
        scale="cpu", root=tmp_path / "runs", results_dir=tmp_path / "results", train_fn=fake_train(calls)
    )
    workdir = tmp_path / "runs" / "cpu" / "a"
    holder = hold_lock(workdir)
    assert sweep.execute([tiny("a")], **kw) == [] and not calls
    holder.kill()  # SIGKILL: the kernel frees its lock
    holder.wait()
    assert sweep.execute([tiny("a")], **kw) == ["a"] and len(calls) == 1 and lock_is_free(workdir)


def test_a_lock_file_holding_garbage_is_no_obstacle(tmp_path):
    calls = []
    kw = dict(
        scale="cpu", root=tmp_path / "runs", results_dir=tmp_path / "results", train_fn=fake_train(calls)
    )
    for rid, content in (("a", f"{socket.gethostname()} not-a-pid"), ("b", "garbage"), ("c", "")):
        (tmp_path / "runs" / "cpu" / rid).mkdir(parents=True)
        (tmp_path / "runs" / "cpu" / rid / sweep.LOCK).write_text(content)
    assert sweep.execute([tiny("a"), tiny("b"), tiny("c")], **kw) == ["a", "b", "c"] and len(calls) == 3


def test_a_real_tiny_run_trains_once_then_is_skipped(tmp_path, capsys):
    kw = dict(scale="cpu", root=tmp_path / "runs", results_dir=tmp_path / "results")
    assert sweep.execute([tiny("real")], **kw) == ["real"]
    assert re.search(r"\[1/1\] real: eval accuracy .*; sweep ETA 0 s", capsys.readouterr().out)
    result = json.loads((tmp_path / "results" / "cpu" / "real.json").read_text())
    assert result["summary"]["step"] == 3 and 0.0 <= result["summary"]["eval/accuracy"] <= 1.0
    assert result["median_step_time_s"] > 0
    assert sweep.execute([tiny("real")], **kw) == []


def test_shared_ids_must_agree_and_runs_are_ordered_by_seed(tmp_path):
    def study(name, body):
        d = tmp_path / name
        d.mkdir()
        (d / "study.py").write_text(
            "from wtjax.tools.sweep import Run\n"
            f"def runs(scale):\n    return {body}\n"
            "def aggregate(results, out_dir, scale):\n    pass\n"
        )
        return d

    one = study(
        "one", "[Run('x', 'configs/tiny.py', 'seed=1', {}, {'seed': 1}), Run('y', 'c', '', {}, {'seed': 0})]"
    )
    same = study("same", "[Run('x', 'configs/tiny.py', 'seed=1', {}, {'seed': 1, 'other': 'tag'})]")
    clash = study("clash", "[Run('x', 'configs/tiny.py', 'seed=2', {}, {'seed': 2})]")
    assert [r.id for r in sweep.study_runs([one, same], "cpu")] == ["y", "x"]
    with pytest.raises(ValueError, match="share the id 'x'"):
        sweep.study_runs([one, clash], "cpu")


def test_aggregation_helpers():
    assert report.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert report.fmt([50.0, 52.0, 54.0]) == "52.0 ± 2.0" and report.fmt([50.0]) == "50.0 ± 0.0 (n=1)"

    def r(seed, acc):
        return {"tags": {"seed": seed}, "summary": {"eval/accuracy": acc}}

    assert report.paired_gain([r(0, 0.5), r(1, 0.7), r(2, 0.9)], [r(1, 0.6), r(0, 0.5)]) == pytest.approx(
        [0.0, 10.0]
    )
    table = report.markdown_table(("a", "b"), [(1, 2)])
    assert table == "| a | b |\n|---|---|\n| 1 | 2 |\n"


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_every_study_run_builds_a_valid_config_at_both_scales(study):
    for scale in ("cpu", "paper"):
        runs = sweep.load_study(study).runs(scale)
        if not runs and scale == "cpu":
            continue  # a paper-scale-only study (ImageNet32, ViT-B/16): nothing runs on the CPU
        assert runs and len({r.id for r in runs}) == len(runs)
        assert {r.tags["seed"] for r in runs} >= {0, 1, 2}  # at least three seeds everywhere
        for run in runs:
            config = sweep.load_config(run)
            config_schema.validate(config)
            config_schema.model_from_config(config.model, num_classes=10)  # the model's own checks


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_committed_tables_are_generated_from_the_committed_results(study, tmp_path):
    """Every run of the CPU scale has a committed result, and aggregating them reproduces the
    committed tables exactly (so no table was edited by hand or left stale)."""
    module = sweep.load_study(study)
    runs = module.runs("cpu")
    missing = [r.id for r in runs if not sweep.result_path(RESULTS, "cpu", r).exists()]
    assert not missing, f"runs without a committed result: {missing}"
    module.aggregate(sweep.load_results(runs, "cpu", RESULTS), tmp_path, "cpu")
    tables = sorted(tmp_path.glob("*.md"))
    assert tables and (list(tmp_path.glob("*.png")) or not runs)  # no runs: a table saying so
    for table in tables:
        assert table.read_text() == (study / table.name).read_text(), f"rerun the aggregation of {study.name}"


def test_the_command_lists_a_study_from_the_repository_root(tmp_path):
    """A fresh process: the study imports the ``experiments`` package with no ``sys.path`` edit."""
    proc = subprocess.run(
        [sys.executable, "-m", "wtjax.tools.sweep", "list", "experiments/fig8_width_vs_depth"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("done  python -m wtjax.main --config=configs/") for line in lines)
    assert all("--workdir=runs/studies/cpu/" in line for line in lines)
