"""The library runs on jax, flax and numpy alone; a part that needs an extra names it when it is missing.

Absence is simulated in a subprocess by an import blocker (a ``sys.meta_path`` finder refusing the
optional packages), so the tests run offline in the installed environment.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from train_utils import ROOT, subprocess_env

from wtjax import _extras

# Every optional package the library must not need. absl is not here: flax itself imports it
# (flax.linen.recurrent), so it comes with flax whatever wtjax declares.
OPTIONAL = (
    "optax",
    "orbax",
    "tensorflow_datasets",
    "tensorflow",
    "ml_collections",
    "tensorboardX",
    "tensorboard",
    "tqdm",
    "matplotlib",
    "sklearn",
    "PIL",
    "chex",
)


def _run_blocked(code: str, blocked=OPTIONAL, timeout=300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``blocked`` fails."""
    blocker = textwrap.dedent(
        f"""
        import sys

        class _Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {tuple(blocked)!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
                return None

        sys.meta_path.insert(0, _Blocker())
        """
    )
    return subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(code)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_library_needs_only_jax_flax_and_numpy():
    proc = _run_blocked(
        """
        import jax
        import jax.numpy as jnp
        import flax.linen as nn

        import wtjax
        from wtjax import MaskSpec, Tied
        from wtjax.analysis import accounting, cka
        from wtjax.implicit import fixed_point
        from wtjax.methods import lora, lora_finetune, pruning
        from wtjax.models import build_model

        class Block(nn.Module):
            @nn.compact
            def __call__(self, z, x):
                return nn.relu(nn.Dense(z.shape[-1])(z) + x)

        x = jnp.ones((2, 8, 8, 3))
        h = jnp.ones((2, 16))
        tied = Tied(Block(), depth=3, mask_mode="multi", mask=MaskSpec(kind="unstructured", density=0.5))
        params = tied.init(jax.random.key(0), jnp.zeros_like(h), h)
        grads = jax.grad(lambda p: jnp.sum(tied.apply(p, jnp.zeros_like(h), h) ** 2))(params)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))

        model = build_model("resnet_like", num_classes=10, width=4, depth=2)
        variables = model.init(jax.random.key(1), x, train=False)
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, x, train=False)
            return jnp.sum(logits ** 2)
        value, grads = jax.value_and_grad(loss)(variables["params"])
        assert jnp.isfinite(value)
        assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(variables["params"]))
        print("library ok")
        """
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "library ok" in proc.stdout


@pytest.mark.parametrize(
    "module, extra, user",
    [
        ("wtjax.main", "train", "the training job (wtjax.main)"),
        ("wtjax.job.train", "train", "the training job (wtjax.job)"),
        ("wtjax.data.pipeline", "train", "the data pipeline (wtjax.data)"),
        ("wtjax.tools.analyse", "train", "the wtjax commands (wtjax.tools)"),
        ("wtjax.analysis.probes", "analysis", "wtjax.analysis.probes"),
    ],
)
def test_a_missing_extra_is_named_with_its_install_command(module, extra, user):
    blocked = ("optax",) if extra == "train" else ("sklearn",)
    proc = _run_blocked(f"import {module}", blocked=blocked)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"wtjax._extras.MissingExtraError: {user} needs the '{extra}' extra of wtjax, and "
        f"{blocked[0]} is not installed: pip install 'wtjax[{extra}]'"
    ), proc.stderr[-3000:]


def test_the_training_command_names_every_missing_package_of_the_extra():
    # As `python -m wtjax.main ...` runs it: the check comes before any optional import.
    proc = _run_blocked(
        """
        import runpy
        sys.argv = ["wtjax.main", "--config=tiny", "--workdir=unused"]
        runpy.run_module("wtjax.main", run_name="__main__", alter_sys=True)
        """
    )
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()[-1]
    assert message.endswith("pip install 'wtjax[train]'"), proc.stderr[-3000:]
    for name in ("optax", "orbax.checkpoint", "tensorflow_datasets", "tqdm", "matplotlib", "sklearn", "PIL"):
        assert name in message
    assert "absl" not in message  # present (flax needs it), so not reported


def test_require_passes_when_installed_and_rejects_an_unknown_extra():
    for extra in _extras.EXTRAS:
        if extra != "tensorboard":  # the viewer is not needed by the tests' environment
            _extras.require(extra, "this test")
    with pytest.raises(KeyError, match="unknown extra 'trian'"):
        _extras.require("trian", "this test")


def _pyproject_extras() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        name: {canonicalize_name(Requirement(r).name) for r in reqs}
        for name, reqs in project["optional-dependencies"].items()
    }


def test_extras_modules_are_the_distributions_pyproject_declares():
    """``_extras.EXTRAS`` (import names) and pyproject's extras (distributions) list the same packages."""
    declared = _pyproject_extras()
    distributions = importlib.metadata.packages_distributions()
    for extra, modules in _extras.EXTRAS.items():
        if extra == "tensorboard":  # not installed in the test environment: name and module agree
            assert declared[extra] == {"tensorboard"} and modules == ("tensorboard",)
            continue
        provided = {canonicalize_name(d) for m in modules for d in distributions[m.split(".")[0]]}
        assert provided == declared[extra], extra
