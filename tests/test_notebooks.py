"""The Colab notebooks run top to bottom (at their smoke-test size, on CPU) and match build.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "experiments" / "notebooks"


def _build_module():
    spec = importlib.util.spec_from_file_location("notebook_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _built():
    module = _build_module()
    return {"quickstart_tpu": module.QUICKSTART, "analysis": module.ANALYSIS, "wt_vs_deq": module.WT_VS_DEQ}


def test_committed_notebooks_are_the_generated_ones_without_outputs():
    built = _built()
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(built)
    for name, nb in built.items():
        committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        assert [c.source for c in committed.cells] == [c.source for c in nb.cells], f"rerun build.py ({name})"
        assert all(not c.get("outputs") for c in committed.cells), f"{name} was saved with outputs"


def test_setup_cell_is_idempotent():
    # Run twice, as a user rerunning the cell: the second run must not move to another folder.
    setup = _build_module().SETUP
    script = f"import os\nfor _ in range(2):\n    exec({setup!r})\n    print(os.getcwd())"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=NOTEBOOKS, capture_output=True, text=True, check=True
    ).stdout
    root = str(NOTEBOOKS.parents[1])
    assert [line for line in out.splitlines() if not line.startswith("repository:")] == [root, root]


@pytest.mark.parametrize("name", ["quickstart_tpu", "analysis", "wt_vs_deq"])
def test_notebook_runs_top_to_bottom(name, monkeypatch, tmp_path):
    monkeypatch.setenv("WTJAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # Runs in the notebooks folder, as Jupyter would; a failing cell raises CellExecutionError.
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
