"""The package's layering: every import points down (or within its own package), and importing is free.

Layers, bottom to top: ``core``, ``implicit``, ``data`` < ``models`` < ``methods``, ``analysis``
< ``job`` < ``tools``, ``main``, ``configs``. A module may import from its own package or from a
strictly lower rank, at any depth (module level or inside a function, ``import a.b`` or ``from a import b``).
``wtjax/__init__.py`` (the public API) and ``wtjax/_moved.py`` (old flat paths) are exempt.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import wtjax
from wtjax import _moved

PACKAGE = Path(__file__).resolve().parents[1] / "wtjax"
RANKS = {
    "_extras": -1,  # which optional extra each layer needs (imports no wtjax module): below every layer
    "core": 0,
    "implicit": 0,
    "data": 0,
    "models": 1,
    "methods": 2,
    "analysis": 2,
    "job": 3,
    "tools": 4,
    "main": 4,
    "configs": 4,  # the packaged run configs: build on the job
}
EXEMPT = {"wtjax", "wtjax._moved"}
PUBLIC_API = ("wtjax", 0)  # ``from wtjax import Tied``: the top-level package re-exports core only
# (importing module, imported module) -> why the upward import is accepted. Keep this short.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, module: str) -> set[str]:
    """Every ``wtjax`` module or attribute ``path`` imports, anywhere in the file, as dotted names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names |= {f"{base}.{alias.name}" for alias in node.names}  # a submodule or an attribute
    return {n for n in names if n == "wtjax" or n.startswith("wtjax.")}


def rank_of(name: str) -> tuple[str, float]:
    """The layer (package name) and rank of an imported ``wtjax`` name (an unknown one ranks above all)."""
    parts = name.split(".")
    if len(parts) == 1 or parts[1] in wtjax.__all__:
        return PUBLIC_API
    return (parts[1], RANKS[parts[1]]) if parts[1] in RANKS else ("unknown", float("inf"))


def test_rank_of_and_relative_imports_resolve():
    assert rank_of("wtjax.job.train.train_and_evaluate") == ("job", 3)
    assert rank_of("wtjax.MaskSpec") == ("wtjax", 0) and rank_of("wtjax.main") == ("main", 4)
    assert rank_of("wtjax.no_such_layer.x")[1] > max(RANKS.values())
    assert module_name(PACKAGE / "core" / "__init__.py") == "wtjax.core"
    assert module_name(PACKAGE / "core" / "spin" / "sharing.py") == "wtjax.core.spin.sharing"


def modules() -> list[tuple[Path, str]]:
    return [(p, module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_module_belongs_to_a_layer():
    unknown = [m for _, m in modules() if m not in EXEMPT and m.split(".")[1] not in RANKS]
    assert not unknown, f"modules outside the layer packages (add their layer to RANKS): {unknown}"


def test_imports_point_down_the_layers():
    violations = []
    for path, module in modules():
        if module in EXEMPT:
            continue
        own, rank = rank_of(module)
        for name in sorted(imported_names(path, module)):
            if any(name == old or name.startswith(old + ".") for old in _moved.MOVED):
                violations.append(f"{module} imports {name}: an old flat path (see wtjax/_moved.py)")
                continue
            layer, target = rank_of(name)
            target_module = ".".join(name.split(".")[:3])
            if layer == own or target < rank or (module, target_module) in ALLOWED:
                continue
            violations.append(f"{module} ({own}, rank {rank}) imports {name} ({layer}, rank {target})")
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_the_checker_sees_lazy_and_from_imports(tmp_path):
    source = (
        "from wtjax import tied, Tied\n"
        "from . import lora\n"
        "from ..job import train\n"
        "def f():\n    import wtjax.tools.sweep as s\n    from wtjax.models.vit import ViT\n"
    )
    path = PACKAGE / "methods" / "example.py"  # named as if it lived there; never written
    tmp = tmp_path / "example.py"
    tmp.write_text(source)
    names = imported_names(tmp, module_name(path))
    assert names == {
        "wtjax.tied",
        "wtjax.Tied",
        "wtjax.methods.lora",
        "wtjax.job.train",
        "wtjax.tools.sweep",
        "wtjax.models.vit.ViT",
    }
    ranks = {n: rank_of(n)[1] for n in names}
    assert ranks["wtjax.Tied"] == 0 and ranks["wtjax.job.train"] == 3 and ranks["wtjax.models.vit.ViT"] == 1


def _python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "svg"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


def test_import_wtjax_is_light():
    heavy = ("tensorflow", "tensorflow_datasets", "optax", "orbax")
    loaded = json.loads(
        _python(
            "import json, sys, wtjax\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})))"
        )
    )
    assert loaded == []


def test_every_module_imports_in_one_process_without_side_effects():
    """All modules side by side (absl flags defined at import would clash: DuplicateFlagError),
    and none switches the matplotlib backend the user chose (``MPLBACKEND=svg`` here)."""
    result = json.loads(
        _python(
            "import importlib, json, pkgutil, warnings, wtjax\n"
            "names = [m.name for m in pkgutil.walk_packages(wtjax.__path__, 'wtjax.')]\n"
            "for name in names:\n"
            "    importlib.import_module(name)\n"
            "import matplotlib\n"
            "print(json.dumps({'modules': names, 'backend': matplotlib.rcParams['backend']}))"
        )
    )
    assert {"wtjax.main", "wtjax.tools.analyse", "wtjax.tools.sweep", "wtjax.job.train"} <= set(
        result["modules"]
    )
    assert result["backend"] == "svg"


def test_the_architecture_doc_names_every_module_and_only_existing_ones():
    """``docs/architecture.md`` matches the code: each module it names exists, and every module of
    the package (``__init__`` files aside) is named. In a line, ``x.py`` after ``wtjax/dir/...``
    means ``wtjax/dir/x.py``."""
    named = set()
    for line in (PACKAGE.parent / "docs" / "architecture.md").read_text().splitlines():
        folder = None
        for token in re.findall(r"`([\w/]+\.py)`", line):
            if token.startswith("wtjax/"):
                folder = token.rpartition("/")[0]
                named.add(token)
            elif folder is not None:
                named.add(f"{folder}/{token}")
    missing = sorted(p for p in named if not (PACKAGE.parent / p).is_file())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
    every = {str(p.relative_to(PACKAGE.parent)) for p, _ in modules() if p.name != "__init__.py"}
    undocumented = sorted(every - named)
    assert not undocumented, f"modules missing from docs/architecture.md: {undocumented}"


def test_old_flat_paths_are_the_new_modules_with_a_deprecation_warning():
    """``import wtjax.tied`` (0.1 layout) gives the very module ``wtjax.core.tied``, warning once."""
    result = json.loads(
        _python(
            "import importlib, json, warnings\n"
            "from wtjax import _moved\n"
            "out = {}\n"
            "for old, new in _moved.MOVED.items():\n"
            "    with warnings.catch_warnings(record=True) as caught:\n"
            "        warnings.simplefilter('always')\n"
            "        module = importlib.import_module(old)\n"
            "    target = importlib.import_module(new)\n"
            "    out[old] = [module is target, target.__spec__.name == new,\n"
            "                any(new in str(w.message) for w in caught\n"
            "                    if w.category is DeprecationWarning)]\n"
            "print(json.dumps(out))"
        )
    )
    assert set(result) == set(_moved.MOVED)
    assert all(all(checks) for checks in result.values()), result
