"""The Colab notebooks run top to bottom (at their smoke-test size, on CPU) and match build.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "experiments" / "notebooks"
BADGE = re.compile(
    r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/([\w./-]+?)/experiments/notebooks/"
)


def _build_module():
    spec = importlib.util.spec_from_file_location("notebook_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _built_like(committed: nbformat.NotebookNode) -> dict[str, nbformat.NotebookNode]:
    """build.py's notebooks, with the repository and branch of ``committed``'s badge if it has one."""
    badge = BADGE.search("".join(c.source for c in committed.cells if c.cell_type == "markdown"))
    return _build_module().notebooks(*(badge.groups() if badge else ()))


def _code(nb: nbformat.NotebookNode) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_committed_notebooks_are_the_generated_ones_without_outputs():
    names = sorted(_build_module().SPECS)
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == names
    for name in names:
        committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        built = _built_like(committed)[name]
        assert [c.source for c in committed.cells] == [c.source for c in built.cells], (
            f"rerun build.py ({name})"
        )
        assert all(not c.get("outputs") for c in committed.cells), f"{name} was saved with outputs"


def test_executed_copies_are_the_notebooks_code_with_outputs_and_plots():
    """executed/<name>.ipynb (build.py --execute) runs the very code of the notebook, and shows it."""
    names = sorted(_build_module().SPECS)
    assert sorted(p.stem for p in (NOTEBOOKS / "executed").glob("*.ipynb")) == names
    for name in names:
        path = NOTEBOOKS / "executed" / f"{name}.ipynb"
        executed = nbformat.read(path, as_version=4)
        assert _code(executed) == _code(_built_like(executed)[name]), f"rerun build.py --execute ({name})"
        outputs = [o for c in executed.cells for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"], name
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no plot"
        assert all(c.get("outputs") or not c.source for c in executed.cells if c.cell_type == "code"), name
        assert path.stat().st_size < 1_000_000, f"{name}: {path.stat().st_size} bytes"
        for machine_path in (str(NOTEBOOKS.parents[1]), sysconfig.get_paths()["purelib"]):
            assert machine_path not in path.read_text(), f"{name} shows this machine's {machine_path}"


def test_badges_and_clone_url_only_with_a_repository():
    module = _build_module()
    plain = module.notebooks()["analysis"]
    assert "colab-badge" not in plain.cells[0].source and module.PLACEHOLDER_URL in plain.cells[1].source
    nb = module.notebooks("someone/wtjax", "dev")["analysis"]
    assert BADGE.search(nb.cells[0].source).groups() == ("someone/wtjax", "dev")
    assert 'REPO_URL = "https://github.com/someone/wtjax.git"' in nb.cells[1].source
    with pytest.raises(SystemExit):
        module.main(["--repository=not a repository"])


def _setup_subprocess(body: str, **env) -> dict:
    """Run the setup cell, then ``body`` (which prints one JSON line), in a fresh interpreter."""
    setup = _build_module().setup_cell()
    script = f"exec({setup!r})\nimport json\n{body}"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=NOTEBOOKS,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_setup_cell_is_idempotent():
    # Run twice, as a user rerunning the cell: the second run must not move to another folder.
    out = _setup_subprocess(f"exec({_build_module().setup_cell()!r})\nprint(json.dumps(os.getcwd()))")
    assert out == str(NOTEBOOKS.parents[1])


def test_setup_helpers_fail_clearly_and_see_the_runtime_jax(tmp_path):
    """The Colab branch's helpers (not run off Colab): a placeholder or unreachable REPO_URL, and a
    runtime jax below wtjax's lower bound, stop with a message saying what to do."""
    out = _setup_subprocess(
        f"""
errors = {{}}
for name, call in {{
    "placeholder": lambda: clone(REPO_URL, {str(tmp_path / "a")!r}),
    "unreachable": lambda: clone({str(tmp_path / "no_such_repository")!r}, {str(tmp_path / "b")!r}),
    "old_jax": lambda: check_jax_bound(ROOT, {{"jax": "0.4.1"}}),
}}.items():
    try:
        call()
    except Exception as e:
        errors[name] = f"{{type(e).__name__}}: {{e}}"
check_jax_bound(ROOT, runtime_jax())  # this environment's jax is within the bound
print(json.dumps({{"errors": errors, "jax": runtime_jax()}}))
"""
    )
    errors = out["errors"]
    assert errors["placeholder"].startswith("ValueError: set REPO_URL"), errors
    assert errors["unreachable"].startswith("RuntimeError: cannot read the git repository REPO_URL="), errors
    assert "wtjax needs jax>=" in errors["old_jax"] and "Runtime > Change runtime type" in errors["old_jax"]
    assert out["jax"]["jax"] == jax.__version__ and out["jax"]["jaxlib"] == jax.__version__
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_setup_install_pins_the_runtime_jax_and_checks_it_is_unchanged(tmp_path):
    """The Colab install, with pip replaced by a recorder: one pip call that installs the train and
    analysis extras under constraints pinning the runtime's jax; a pip that changed jax is caught."""
    out = _setup_subprocess(
        """
import types

calls = []
def recording_pip(cmd, **kwargs):
    calls.append(cmd)
    return types.SimpleNamespace(returncode=0)

subprocess = types.SimpleNamespace(run=recording_pip)  # the helpers look it up at call time
install_keeping_runtime_jax(ROOT)
constraints = open(calls[0][calls[0].index("-c") + 1]).read().split()
real_runtime_jax = runtime_jax

def pip_replacing_jax(cmd, **kwargs):
    global runtime_jax
    runtime_jax = lambda: {**real_runtime_jax(), "jax": "9.9.9"}
    return types.SimpleNamespace(returncode=0)

subprocess = types.SimpleNamespace(run=pip_replacing_jax)
try:
    install_keeping_runtime_jax(ROOT)
    changed = None
except AssertionError as e:
    changed = str(e)
print(json.dumps({"calls": calls, "constraints": constraints, "jax": real_runtime_jax(), "changed": changed}))
""",
        TMPDIR=str(tmp_path),
    )
    root = str(NOTEBOOKS.parents[1])
    [call] = out["calls"]
    assert call[1:4] == ["-m", "pip", "install"] and call[-2:] == ["-e", f"{root}[train,analysis]"]
    assert out["constraints"] == [f"{n}=={v}" for n, v in sorted(out["jax"].items())]
    assert {"jax", "jaxlib"} <= set(out["jax"])
    assert out["changed"].startswith("the install changed the runtime's jax") and "9.9.9" in out["changed"]


def test_the_tpu_quickstart_refuses_to_run_off_a_tpu(monkeypatch):
    cell = next(s for s in _code(_build_module().notebooks()["quickstart_tpu"]) if "REQUIRE_TPU" in s)
    monkeypatch.delenv("WTJAX_REQUIRE_TPU", raising=False)
    assert jax.default_backend() == "cpu"
    with pytest.raises(AssertionError, match="not on a TPU. On Colab: Runtime > Change runtime type > TPU"):
        exec(cell, {"os": __import__("os")})  # noqa: S102
    monkeypatch.setenv("WTJAX_REQUIRE_TPU", "0")  # the explicit opt-out: a CPU dry run
    exec(cell, {"os": __import__("os")})  # noqa: S102


@pytest.mark.parametrize("name", ["quickstart_tpu", "analysis", "wt_vs_deq"])
def test_notebook_runs_top_to_bottom(name, monkeypatch, tmp_path):
    monkeypatch.setenv("WTJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("WTJAX_REQUIRE_TPU", "0")  # on CPU: the quickstart's opt-out of its TPU check
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # Runs in the notebooks folder, as Jupyter would; a failing cell raises CellExecutionError.
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
