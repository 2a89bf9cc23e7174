"""The side-by-side step-time benchmark of a study: which runs it times and what it records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.benchmarks import study_step_times
from wtjax.tools import sweep

ROOT = Path(__file__).resolve().parents[1]

STUDY = """
from wtjax.tools.sweep import Run

def runs(scale):
    if scale != "cpu":
        return []
    return [
        Run(f"{m}_s{s}", "configs/tiny.py", f"steps=50,mask_mode={m},seed={s}", {}, {"mode": m, "seed": s})
        for s in (1, 2)
        for m in ("dense", "multi")
    ]
"""


@pytest.fixture
def study_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the runs name their config from the repository root
    (tmp_path / "study.py").write_text(STUDY)
    return tmp_path


def test_timing_config_cuts_the_run_short_and_saves_nothing_on_the_way(study_dir):
    run = study_step_times.first_seed_runs(sweep.load_study(study_dir), "cpu")[0]
    config = study_step_times.timing_config(run, steps=6, train_images=32, log_every=3)
    assert (config.num_train_steps, config.log_every_steps, config.data.train_subset) == (6, 3, 32)
    assert (config.eval_every_steps, config.checkpoint_every_steps, config.seed) == (0, 0, 1)
    assert sweep.load_config(run).num_train_steps == 50  # the run's own definition is untouched


def test_times_one_run_per_program_over_alternating_rounds(study_dir, capsys):
    study_step_times.main(
        [str(study_dir), "--scale=cpu", "--steps=5", "--rounds=2", "--train_images=32", "--log_every=2"]
    )
    record = json.loads((study_dir / study_step_times.FILE_NAME).read_text())  # the cpu tables' folder
    assert sorted(record["runs"]) == ["dense_s1", "multi_s1"]  # the lowest seed only
    for timed in record["runs"].values():
        # Per round: logs at steps 2, 4 and 5; the first interval starts after the compile step.
        assert len(timed["step_times_s"]) == 2 * 3
        assert min(timed["step_times_s"]) > 0
        middle = sorted(timed["step_times_s"])[2:4]
        assert timed["median_s"] == pytest.approx(sum(middle) / 2)
    assert study_step_times.load(study_dir) == record
    assert study_step_times.load(study_dir / "paper") is None
    order = [
        line.split()[2].rstrip(":")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("round")
    ]
    assert order == ["dense_s1", "multi_s1", "multi_s1", "dense_s1"]


def test_a_scale_without_runs_is_refused(study_dir):
    with pytest.raises(SystemExit, match="no runs at scale 'paper'"):
        study_step_times.main([str(study_dir), "--scale=paper"])
