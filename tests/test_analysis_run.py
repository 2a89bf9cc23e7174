"""The analysis command runs on checkpoints of the training job and writes its plots and numbers."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
from train_utils import ROOT, cache_env, compilation_cache, load_config, subprocess_env

from wtjax.job.train import train_and_evaluate
from wtjax.tools import analyse


def test_analysis_on_a_trained_checkpoint(tmp_path):
    config = load_config("tiny", "steps=4")
    config.data.num_eval = 40
    # The command below analyses the same checkpoint with the same programs: it loads them from
    # this persistent compilation cache instead of compiling them again.
    cache = tmp_path / "xla_cache"
    with compilation_cache(cache):
        train_and_evaluate(config, tmp_path / "multi")
        results = analyse.analyse([tmp_path / "multi"], tmp_path / "out", num_examples=40, cka_batch=0)
    res = results["multi"]
    assert res["layers"] == ["stem", "1", "2", "pool"] and res["examples"] == 40
    # A damaged newest checkpoint is skipped (named on stdout) for the newest one that verifies.
    damaged = shutil.copytree(tmp_path / "multi", tmp_path / "damaged")
    data = max(
        (damaged / "checkpoints" / "4").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0
    )
    data.write_bytes(data.read_bytes()[:-8] + b"garbage!")
    assert analyse.load_run(damaged)[-1] == 2
    cka = np.asarray(res["cka"])
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-6)
    np.testing.assert_allclose(cka, cka.T)
    assert all(0.0 <= a <= 1.0 for a in res["probe_accuracy"])
    for name in ("multi_cka.png", "multi_cka.npy", "probes.png", "analysis.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "analysis.json").read_text())["multi"]["checkpoint_step"] == 4
    # The command: same numbers from a fresh process (its flags are defined only when it runs).
    cmd = [sys.executable, "-m", "wtjax.tools.analyse", f"--workdir={tmp_path / 'multi'}"]
    cmd += [f"--out={tmp_path / 'cli'}", "--num_examples=40", "--cka_batch=0"]
    # The checkpoint's topology (conftest's 4 CPU devices), and the programs compiled above.
    env = subprocess_env(JAX_NUM_CPU_DEVICES=4, **cache_env(cache))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads((tmp_path / "cli" / "analysis.json").read_text())["multi"]
    np.testing.assert_allclose(cli["cka"], res["cka"], atol=1e-6)
    assert cli["probe_accuracy"] == res["probe_accuracy"]
    python_info = re.findall(r"^I\d{4} [\d:.]+ +\d+ \S+\.py:\d+\]", proc.stderr, re.M)
    assert not python_info, python_info[:3]  # orbax's INFO lines (23 of them) are silenced
