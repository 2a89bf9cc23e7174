"""The built wheel runs the documented commands from an empty folder: the configs ship inside it."""

from __future__ import annotations

import shutil
import subprocess
import sys

from train_utils import ROOT, subprocess_env


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def test_the_wheel_runs_packaged_configs_by_name_from_an_empty_folder(tmp_path):
    # Build from a copy of what the wheel is made of, so the checkout gets no build/ or egg-info.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "wtjax", source / "wtjax", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            source,
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            wheels,
        ]
    )
    # A fresh venv that borrows the installed dependencies (jax, flax, ...) but not this checkout.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv])
    _run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "-q", next(wheels.glob("*.whl"))])
    empty = tmp_path / "empty"
    empty.mkdir()
    env = subprocess_env()
    env.pop("PYTHONPATH")
    where = _run([venv / "bin" / "python", "-c", "import wtjax; print(wtjax.__file__)"], cwd=empty, env=env)
    assert where.stdout.startswith(str(venv)), where.stdout  # the wheel's package, not the checkout's
    steps = ["--config.num_train_steps=4", "--config.accounting=False", "--jax_platforms=cpu"]
    _run([venv / "bin" / "wtjax-train", "--config=tiny", "--workdir=tiny", *steps], cwd=empty, env=env)
    quick = ["-m", "wtjax.main", "--config=digits_quickstart:width=8,depth=2", "--workdir=quick"]
    quick += [*steps, "--config.optim.warmup_epochs=0"]
    _run([venv / "bin" / "python", *quick], cwd=empty, env=env)
    for run in ("tiny", "quick"):
        assert (empty / run / "summary.json").is_file()
    # The other console scripts start and list their flags (absl's --helpfull exits with status 1).
    for script, option, flag in (
        ("wtjax-analyse", "--helpfull", "--num_examples"),
        ("wtjax-sweep", "--help", "--shard"),
    ):
        cmd = [venv / "bin" / script, option]
        proc = subprocess.run(cmd, cwd=empty, env=env, capture_output=True, text=True, timeout=120)
        assert flag in proc.stdout + proc.stderr, proc.stderr[-2000:]
