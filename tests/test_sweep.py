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

import numpy as np
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


def study_scales(module) -> tuple[str, ...]:
    """The scales a study defines runs for (``SCALES``; by default the CPU and the paper scale)."""
    return getattr(module, "SCALES", ("cpu", "paper"))


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_every_study_run_builds_a_valid_config_at_its_scales(study):
    module = sweep.load_study(study)
    for scale in study_scales(module):
        runs = module.runs(scale)
        assert runs and len({r.id for r in runs}) == len(runs)
        assert {r.tags["seed"] for r in runs} >= {0, 1, 2}  # at least three seeds everywhere
        for run in runs:
            config = sweep.load_config(run)
            config_schema.validate(config)
            config_schema.model_from_config(config.model, num_classes=10)  # the model's own checks


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_committed_tables_are_generated_from_the_committed_results(study, tmp_path):
    """Every run of the committed scale (``cpu``, or the study's ``COMMITTED_SCALE``) has a committed
    result, unless the study says it is still running (``COMPLETE = False``), and aggregating them
    reproduces the committed tables exactly (so no table was edited by hand or left stale)."""
    module = sweep.load_study(study)
    scale = getattr(module, "COMMITTED_SCALE", "cpu")
    runs = module.runs(scale)
    missing = [r.id for r in runs if not sweep.result_path(RESULTS, scale, r).exists()]
    assert not missing or not getattr(module, "COMPLETE", True), f"runs without a committed result: {missing}"
    module.aggregate(sweep.load_results(runs, scale, RESULTS), tmp_path, scale)
    tables = sorted(tmp_path.glob("*.md"))
    assert tables and (list(tmp_path.glob("*.png")) or not runs)  # no runs: a table saying so
    committed = sweep.tables_dir(study, scale)  # where `sweep aggregate` writes them
    for table in tables:
        assert table.read_text() == (committed / table.name).read_text(), (
            f"rerun the aggregation of {study.name}"
        )


def fake_finished(runs, seed=0) -> list[dict]:
    """Results of ``runs`` as if all had finished: random accuracies and step times."""
    rng = np.random.default_rng(seed)
    summary = {"step": 1, "num_params": 1, "accounting": {"active": 1, "flops_per_image": 1.0}}
    return [
        {
            "id": r.id,
            "tags": dict(r.tags),
            "overrides": dict(r.overrides),
            "summary": {**summary, "eval/accuracy": float(rng.random())},
            "eval_curve": [],
            "median_step_time_s": float(rng.random()),
        }
        for r in runs
    ]


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_every_claim_finds_its_runs_at_every_scale(study, monkeypatch):
    """With every run of a scale finished, each claim pairs all three seeds: a claim that looks for
    runs its scale does not define (a width or tag of another scale) would say "running" forever."""
    module = sweep.load_study(study)
    if not hasattr(module, "claims"):
        pytest.skip("no claims")
    if hasattr(module, "_analysis"):  # Fig. 6 analyses checkpoints: random CKA and probe accuracies
        rng = np.random.default_rng(0)
        monkeypatch.setattr(
            module, "_analysis", lambda r: {"cka": rng.random((10, 10)), "probe_accuracy": rng.random(10)}
        )
    for scale in study_scales(module):
        rows = module.claims(fake_finished(module.runs(scale)), scale)
        assert rows, scale
        for row in rows:
            assert "; 3 seeds," in row["ours"], (scale, row)


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


def test_the_committed_claim_table_is_what_aggregate_all_writes():
    """experiments/README.md opens with the claim table of every study, from the committed results."""
    readme = ROOT / "experiments" / "README.md"
    studies = sweep.all_studies(ROOT / "experiments")
    assert studies == STUDIES
    text = readme.read_text()
    expected = sweep.replace_claims(readme, sweep.claims_table(studies, "cpu", RESULTS, readme))
    assert text == expected, "rerun python -m wtjax.tools.sweep aggregate --all"
    table = text.split(sweep.CLAIMS_BEGIN)[1].split(sweep.CLAIMS_END)[0]
    verdicts = re.findall(r"\| (reproduced|contradicted|inconclusive) \| \[", table)
    assert len(verdicts) >= 10  # every comparison study contributes rows with a verdict


STUDY_WITH_CLAIMS = """
from experiments.report import Comparison, claim
from wtjax.tools.sweep import Run
COMMITTED_SCALE = "cpu32"
def runs(scale):
    assert scale in ("cpu32", "paper"), scale
    return [Run(f"r{m}_s{s}", "c.py", "", {}, {"seed": s, "m": m}) for s in (0, 1, 2) for m in "ab"]
def aggregate(results, out_dir, scale):
    (out_dir / "results.md").write_text(f"{len(results)} results at {scale}\\n")
def claims(results, scale):
    a = [r for r in results if r["tags"]["m"] == "a"]
    b = [r for r in results if r["tags"]["m"] == "b"]
    return [claim("a beats b | really", Comparison.paired("a - b", a, b, +1, paper="+1"), scale)]
"""

STUDY_WITHOUT_THE_SCALE = """
def runs(scale):
    raise KeyError(f"unknown scale {scale!r}")
def aggregate(results, out_dir, scale):
    raise AssertionError("not called")
"""

STUDY_AT_THE_PAPER_SCALE_ONLY = """
SCALES = ("paper",)
def runs(scale):
    assert scale == "paper", "not called at another scale"
    return []
def aggregate(results, out_dir, scale):
    assert scale == "paper", "not called at another scale"
    (out_dir / "results.md").write_text("none yet\\n")
"""

STUDY_WITHOUT_CLAIMS = '''
"""A study not run at this scale.

More text."""
def runs(scale):
    return []
def aggregate(results, out_dir, scale):
    (out_dir / "results.md").write_text("none\\n")
'''


def test_aggregate_all_tolerates_studies_without_results_claims_or_runs(tmp_path, capsys):
    root = tmp_path / "studies"
    studies = (
        ("a_claims", STUDY_WITH_CLAIMS),
        ("b_none", STUDY_WITHOUT_CLAIMS),
        ("c_other", STUDY_WITHOUT_THE_SCALE),
        ("d_paper", STUDY_AT_THE_PAPER_SCALE_ONLY),
    )
    for name, body in studies:
        (root / name).mkdir(parents=True)
        (root / name / "study.py").write_text(body)
    readme = root / "README.md"
    readme.write_text(f"# Title\n\n{sweep.CLAIMS_BEGIN}\nold table\n{sweep.CLAIMS_END}\n\nkept text\n")
    results = tmp_path / "results"
    # No results yet: the claim has no verdict and says it is running.
    sweep.main(["aggregate", "--all", f"--studies_dir={root}", f"--results={results}"])
    text = readme.read_text()
    assert text.startswith(f"# Title\n\n{sweep.CLAIMS_BEGIN}\n| claim | paper | ours | verdict | study |")
    assert text.endswith(f"{sweep.CLAIMS_END}\n\nkept text\n") and "old table" not in text
    assert (
        "| a beats b \\| really | +1 | running: no results yet (cpu32) | — | [a_claims](a_claims/) |" in text
    )
    assert (
        "| A study not run at this scale. |  | no runs at scale 'cpu' | (no claims) | [b_none](b_none/) |"
        in text
    )
    assert "| c_other |  | not run at scale 'cpu' | — | [c_other](c_other/) |" in text
    assert "| d_paper |  | not run at scale 'cpu' (its scales: paper) | — | [d_paper](d_paper/) |" in text
    # The committed tables of a study at a scale of its own go where `aggregate` puts that scale's.
    assert (root / "a_claims" / "cpu32" / "results.md").read_text() == "0 results at cpu32\n"
    # Results of the study's own scale arrive: a verdict from the paired differences.
    for seed, (a, b) in enumerate(((0.6, 0.5), (0.71, 0.6), (0.69, 0.6))):
        for m, acc in (("a", a), ("b", b)):
            (results / "cpu32").mkdir(parents=True, exist_ok=True)
            (results / "cpu32" / f"r{m}_s{seed}.json").write_text(
                json.dumps({"summary": {"eval/accuracy": acc}})
            )
    sweep.main(["aggregate", "--all", f"--studies_dir={root}", f"--results={results}"])
    row = next(line for line in readme.read_text().splitlines() if line.startswith("| a beats b"))
    assert "+10.00 pts, 95% CI [+7.52, +12.48]; 3 seeds, cpu32 | reproduced |" in row  # 10 ± 4.303 / sqrt(3)
    assert "claims of 4 studies" in capsys.readouterr().out
    # Another scale leaves the committed table alone and writes its own claims file.
    before = readme.read_text()
    sweep.main(["aggregate", "--all", "--scale=paper", f"--studies_dir={root}", f"--results={results}"])
    paper = (root / "paper" / "claims.md").read_text()
    assert readme.read_text() == before and paper.startswith("# Claims at scale paper (generated)")
    assert "| a beats b \\| really | +1 | running: no results yet (paper) | — |" in paper
    assert (root / "a_claims" / "paper" / "results.md").exists() and not (root / "c_other" / "paper").exists()
    assert (root / "d_paper" / "paper" / "results.md").exists() and not (
        root / "d_paper" / "results.md"
    ).exists()


def test_a_readme_without_the_markers_or_a_malformed_claim_is_refused(tmp_path):
    (tmp_path / "README.md").write_text("# no markers\n")
    with pytest.raises(ValueError, match="no claim block"):
        sweep.replace_claims(tmp_path / "README.md", "| table |\n")
    d = tmp_path / "bad"
    d.mkdir()
    (d / "study.py").write_text(
        "def runs(scale):\n    return []\ndef aggregate(results, out_dir, scale):\n    pass\n"
        "def claims(results, scale):\n    return [{'claim': 'x', 'paper': '', 'ours': ''}]\n"
    )
    with pytest.raises(ValueError, match="needs exactly the keys"):
        sweep.claim_rows(d, "cpu", tmp_path / "results")
