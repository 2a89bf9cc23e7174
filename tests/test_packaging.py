"""The built wheel runs the documented commands from an empty folder: the configs ship inside it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
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
    wheel = next(wheels.glob("*.whl"))
    _check_wheel_requirements(wheel)
    env = subprocess_env()
    env.pop("PYTHONPATH")  # else pip may take a checkout's wtjax.egg-info for wtjax installed, and skip
    _run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "-q", wheel], env=env)
    empty = tmp_path / "empty"
    empty.mkdir()
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


def _check_wheel_requirements(wheel) -> None:
    """The wheel requires only jax, flax and numpy; everything else comes with an extra."""
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [
        Requirement(line.split(":", 1)[1])
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert sorted(r.name for r in requires if r.marker is None) == ["flax", "jax", "numpy"]
    extras = {
        line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Provides-Extra:")
    }
    assert {"train", "analysis", "tensorboard", "all", "dev", "aot"} <= extras


def _requirements() -> list[Requirement]:
    """Every direct requirement of pyproject.toml (library and extras), but the extras' self-references."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for reqs in project["optional-dependencies"].values() for r in reqs]
    return [Requirement(r) for r in lines if Requirement(r).name != project["name"]]


def _lower_bound(req: Requirement) -> str:
    bounds = [s.version for s in req.specifier if s.operator in (">=", "==")]
    assert len(bounds) == 1, f"{req}: one lower bound (>= or ==) expected"
    return bounds[0]


def test_the_ci_constraints_pin_every_dependency_at_its_lower_bound():
    """.ci/lower-bounds.txt is pyproject's lower bounds, one pin per distribution, nothing else."""
    pins = {}
    for line in (ROOT / ".ci" / "lower-bounds.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            assert not pin.extras and [s.operator for s in pin.specifier] == ["=="], line
            pins[canonicalize_name(pin.name)] = next(iter(pin.specifier)).version
    expected = {}
    for req in _requirements():
        name, bound = canonicalize_name(req.name), _lower_bound(req)
        assert expected.setdefault(name, bound) == bound, f"{name}: two lower bounds in pyproject.toml"
    assert pins == expected


def test_no_upper_caps_but_the_documented_ones():
    """No cap on jax, flax, ...: a cap carries its known break beside it (ruff), and the aot extra's
    ``==`` pins (explained above the extra) equal the jax lower bound."""
    text = (ROOT / "pyproject.toml").read_text()
    optional = tomllib.loads(text)["project"]["optional-dependencies"]
    for req in _requirements():
        capped = any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier)
        if capped and not any(str(req) == str(Requirement(r)) for r in optional["aot"]):
            line = next(line for line in text.splitlines() if line.strip().startswith(f'"{req.name}'))
            assert "#" in line, f"{req}: an upper cap needs its known break documented beside it"
    jax = next(r for r in _requirements() if r.name == "jax" and not r.extras)
    assert [s.operator for s in jax.specifier] == [">="]
    assert all(_lower_bound(Requirement(r)) == _lower_bound(jax) for r in optional["aot"])


def test_ci_installs_exactly_as_the_readme_says():
    """The README's developer install line is .ci/run's install command, word for word."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pip install" in line]
    assert len(ci) == 1 and "-c .ci/lower-bounds.txt" in ci[0]
    install = re.search(r"## Install\n+```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert shlex.split(install) == shlex.split(ci[0])
