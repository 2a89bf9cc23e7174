"""Helpers shared by the training-job tests (configs, checkpoints, subprocess runs, a probe model)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from wtjax.job.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def load_config(name: str, arg: str | None = None, **overrides):
    """``configs/<name>.py``'s ``get_config(arg)`` with dotted ``overrides`` (``'optim.name'``)."""
    config = load_config_file(CONFIGS / f"{name}.py", arg)
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def checkpoint_steps(workdir) -> list[int]:
    """The complete checkpoints (numbered directories) of a run."""
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def read_params(workdir, step: int | None = None):
    """The parameters of checkpoint ``step`` (default: the newest) as a numpy pytree."""
    step = max(checkpoint_steps(workdir)) if step is None else step
    path = Path(workdir).absolute() / "checkpoints" / str(step) / "default"
    checkpointer = ocp.StandardCheckpointer()
    # Restore onto this process's first device, whatever topology wrote the checkpoint.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata,
    )
    return jax.tree.map(np.asarray, checkpointer.restore(path, target)["params"])


def assert_trees_equal(a, b, *, rtol=0.0, atol=0.0):
    """Same structure, leaves equal (bitwise when the tolerances are 0)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if rtol == 0.0 and atol == 0.0:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@contextlib.contextmanager
def compilation_cache(directory):
    """A persistent XLA compilation cache for the duration of a test module.

    Runs of the same config in one test compile identical programs; the cache turns the second
    and later compilations into loads. Uses jax's private ``reset_cache`` so a cache configured
    after the first compilation takes effect (and is switched off again afterwards).
    """
    from jax._src import compilation_cache as cc

    old = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
        jax.config.jax_persistent_cache_min_entry_size_bytes,
    )
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", old[2])
        cc.reset_cache()


def subprocess_env(**extra) -> dict:
    """Environment for a child Python: repo on the path, one CPU device, quiet logs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("JAX_NUM_CPU_DEVICES", "1")  # the job's default is one device per core
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cache_env(directory) -> dict:
    """Environment variables giving child processes one persistent XLA compilation cache: runs of
    the same config in one test then compile once and load the program afterwards."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(directory),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": 0,
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": 0,
    }


def run_main(
    args: list[str], *, timeout: float = 240, env: dict | None = None, **popen_kwargs
) -> subprocess.CompletedProcess:
    """``python -m wtjax.main <args>`` in a subprocess (from the repository root); ``env``
    defaults to :func:`subprocess_env`."""
    return subprocess.run(
        [sys.executable, "-m", "wtjax.main", *args],
        cwd=ROOT,
        env=subprocess_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen_kwargs,
    )


def write_cifar_binary(root: Path, n_per_file: int, n_test: int, seed: int = 0) -> Path:
    """A CIFAR-10 binary release (``cifar-10-batches-bin``) of random records: 1 label + 3072 bytes."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    names = [*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin"]
    for name, n in zip(names, [n_per_file] * 5 + [n_test], strict=True):
        labels = rng.integers(0, 10, size=(n, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        np.concatenate([labels, pixels], axis=1).tofile(d / name)
    return d


def write_image_folder(
    root: Path, classes: list[str], per_class: int, shape=(8, 8, 3), seed: int = 0
) -> Path:
    """A class-folder tree ``root/<class>/<i>.png`` of random images."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    return root


class ProbeModel(nn.Module):
    """A linear classifier exercising the train loop's model conventions.

    It declares a ``step`` keyword (so the loop passes the step), returns ``out['aux_loss']`` (a
    weight penalty) and ``out['metrics']`` (the step it saw), and emits NaN logits from
    ``nan_from_step`` on (training only), to trigger the NaN guard.
    """

    num_classes: int = 10
    aux_weight: float = 0.1
    nan_from_step: int = -1

    @nn.compact
    def __call__(self, images, *, train: bool = False, step=None):
        dense = nn.Dense(self.num_classes, name="head")
        logits = dense(images.reshape(images.shape[0], -1))
        aux = self.aux_weight * jnp.sum(dense.variables["params"]["kernel"] ** 2)
        seen = jnp.asarray(-1 if step is None else step, jnp.float32)
        if train and self.nan_from_step >= 0:
            logits = jnp.where(seen >= self.nan_from_step, jnp.nan, logits)
        return logits, {"pre_logits": images, "aux_loss": aux, "metrics": {"seen_step": seen}}


# The holder loads the lock module by path: it is stdlib-only, and this skips importing jax.
HOLD_LOCK = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("workdir_lock", sys.argv[1])
    module = sys.modules["workdir_lock"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lock = module.acquire(sys.argv[2])
    print("locked", flush=True)
    time.sleep(600)
    """
)


def hold_lock(workdir) -> subprocess.Popen:
    """A subprocess holding the lock of ``workdir`` (returned once it holds it; kill it to free it)."""
    from wtjax.job import workdir_lock

    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, workdir_lock.__file__, str(workdir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc
