r"""Accelerator check: what the training job does on the accelerator this script finds.

Run it the day a TPU or GPU is lent; it takes a few minutes and needs nothing but this repository
(the training run uses the bundled scikit-learn digits unless ``--cifar_dir`` is given):

    python -m experiments.accelerator_check --out=accelerator_check.json
    python -m experiments.accelerator_check --out=check.json --cifar_dir=/data/cifar10 --cifar_epochs=3
    JAX_PLATFORMS=cpu python -m experiments.accelerator_check --small --out=/tmp/check.json  # smoke run

It measures, printing as it goes and rewriting the JSON after every section (a crash keeps what
was measured; a failed section records its error and the others still run):

1. ``devices``: platform, device kind and count, processes, jax/flax versions, the public peak
   (dense bfloat16 FLOP/s and HBM per JAX device) used for MFU, or none for an unknown kind;
2. ``step_time.float32`` / ``step_time.bfloat16``: the job's data-parallel training step
   (:func:`wtjax.job.parallel.jit_train_step`, compiled by :func:`wtjax.tools.aot.compile_train_step`) of
   ``configs/cifar_resnet.py`` at the paper's "Small" shape (width 44, K=8, multi-mask density 0.5,
   global batch 128, 32x32x3) with ``model.dtype`` set: compile time, median of the timed steps
   after warm-up (random data already on the devices: the input pipeline is not timed), FLOPs per
   step (:func:`wtjax.tools.aot.jaxpr_flops`: matmuls and convolutions, scans counted K times, masked
   kernels counted dense as they are executed), achieved FLOP/s, MFU against the peak of all
   devices, XLA's per-device memory and the devices' peak bytes in use;
3. ``compile_time.K=4`` / ``compile_time.K=32``: compile time of the same step at K=4 and K=32;
4. ``training_run``: a short real run of the training job (``train_and_evaluate``), the offline
   digits quickstart or, with ``--cifar_dir``, CIFAR-10 at the Small width for ``--cifar_epochs``;
   its final accuracy, eval split and wall time.

``--small`` (automatic on CPU; ``--no-small`` forces the paper's shapes) shrinks everything
(width 8, K=4, batch 16, a 2-epoch training run) so the whole check takes well under a minute on
a CPU: ``tests/test_accelerator_check.py`` runs it that way. The global batch must divide over the
devices; when it does not, it is rounded up to a multiple of the device count (recorded). The
check uses the devices of this process (one host).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import numpy as np

from experiments.benchmarks.chips import peak_for
from wtjax.job import config as config_schema
from wtjax.job import metrics, optim, parallel, steps
from wtjax.tools import aot

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
NUM_CLASSES = 10
GIB = 2**30

# The paper's "Small" ResNet-like shape and the CPU smoke shape. ``depth`` is the K of the timed
# step; the compile-time section always compiles K=4 and K=32 (with a scan, compile time should
# hardly depend on K, which is what the section checks). The smoke shape times K=4, so its
# float32 step compile doubles as the K=4 compile (one XLA:CPU compile fewer in the test).
PAPER = dict(width=44, depth=8, batch=128, image_shape=(32, 32, 3), steps=20, warmup=3)
SMALL = dict(width=8, depth=4, batch=16, image_shape=(32, 32, 3), steps=3, warmup=1)
COMPILE_DEPTHS = (4, 32)
DTYPES = ("float32", "bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="accelerator_check.json", help="JSON file written after every section")
    p.add_argument(
        "--small",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="smoke-test shapes (default: on for CPU, off for accelerators)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per dtype (default 20; small 3)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps after compile (default 3; small 1)"
    )
    p.add_argument("--cifar_dir", default=None, help="local CIFAR-10 copy (config data.data_dir)")
    p.add_argument("--cifar_epochs", type=float, default=3.0, help="epochs of the CIFAR-10 run")
    p.add_argument(
        "--cifar_holdout",
        type=int,
        default=5000,
        help="evaluate on the last N training images (train-only class-folder copies need it); 0: test split",
    )
    p.add_argument("--workdir", default=None, help="keep the training run here (default: a temporary dir)")
    p.add_argument("--skip_training", action="store_true", help="skip the training run")
    return p.parse_args(argv)


class Report:
    """The JSON report: sections are run one by one, each saved (or its error recorded) at once."""

    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        self.data = {**header, "errors": {}}
        self.save()

    def save(self) -> None:
        """Write atomically, so a crash mid-write never leaves a truncated file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, self.path)

    def run(self, key: tuple[str, ...], fn, *args):
        """``fn(*args)`` stored at ``data[key[0]][key[1]]...``; an exception is recorded, not raised."""
        name = ".".join(key)
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            value = fn(*args)
        except Exception as e:  # one failed section must not lose the others
            value = {"error": f"{type(e).__name__}: {e}"}
            self.data["errors"][name] = traceback.format_exc(limit=20)
            print(f"   FAILED: {value['error']}", flush=True)
        value["section_s"] = time.perf_counter() - t0
        node = self.data
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
        self.save()
        return value


def _jsonable(x):
    """numpy scalars and other stragglers as plain JSON values."""
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def memory_stats() -> dict:
    """Peak and limit of bytes in use over this process's devices (None where not reported: CPU).

    ``peak_bytes_in_use`` is the peak since the process started, so a later section's reading
    includes the earlier sections' programs.
    """
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    limits = [s["bytes_limit"] for s in stats if "bytes_limit" in s]
    return {
        "device_peak_bytes_in_use": max(peaks) if peaks else None,
        "memory_limit_bytes": min(limits) if limits else None,
    }


def device_info() -> dict:
    """What this process sees: devices, processes, versions, and the peak used for MFU."""
    import flax

    devices = jax.devices()
    kind = devices[0].device_kind
    info = {
        "platform": devices[0].platform,
        "device_kind": kind,
        "device_kinds": sorted({d.device_kind for d in devices}),
        "num_devices": len(devices),
        "num_local_devices": jax.local_device_count(),
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "devices": [str(d) for d in devices[:16]],
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,  # compile times are loads if set
        **memory_stats(),
    }
    peak = peak_for(kind)
    info.update(peak or {"peak_flops_per_device": None, "hbm_bytes_per_device": None, "peak_source": None})
    print(
        f"   {info['num_devices']} x {kind} ({info['platform']}), {info['process_count']} process(es); "
        f"peak {peak['peak_source'] if peak else 'unknown: MFU not computed'}",
        flush=True,
    )
    return info


def step_config(shape: dict, depth: int, dtype: str, num_devices: int):
    """``configs/cifar_resnet.py`` at ``shape`` and ``depth`` with compute dtype ``dtype``.

    The global batch is rounded up to a multiple of the device count (the job requires it).
    """
    config = config_schema.load_config_file(
        CONFIGS / "cifar_resnet.py", f"width={shape['width']},depth={depth}"
    )
    config.batch_size = -(-shape["batch"] // num_devices) * num_devices
    if "dtype" not in config.model:
        raise KeyError("config.model has no 'dtype' field: this checkout predates mixed precision")
    config.model.dtype = dtype
    return config


_INITS: dict = {}  # compiled init programs, one per (model, optimizer, shape, mesh)


def initial_state(config, mesh, image_shape):
    """The real initial state, built as :func:`wtjax.tools.aot.abstract_step_args` builds its shapes.

    Parameters, hence the optimizer state, are float32 under every compute dtype
    (:mod:`wtjax.core.precision`), so the init program is built from the float32 model and compiled
    once for both dtypes' steps (compiling ``model.init`` costs as much as the step on CPU).
    """
    model_config = {**config.model.to_dict(), "dtype": "float32"}
    key = (json.dumps([model_config, config.optim.to_dict()], sort_keys=True, default=str), config.seed)
    key += (tuple(image_shape), mesh)
    if key not in _INITS:
        model = config_schema.model_from_config(model_config, NUM_CLASSES)
        tx, _ = optim.create_optimizer(config.optim, total_steps=1000, steps_per_epoch=100)
        init = steps.make_init_state(model, tx, tuple(image_shape), jax.random.PRNGKey(config.seed))
        _INITS[key] = jax.jit(init, out_shardings=parallel.replicated(mesh))
    return _INITS[key]()  # fresh buffers on every call: each dtype's steps donate their own


def random_batch(config, mesh, image_shape, seed: int = 0) -> dict:
    """A random global batch split over the mesh (normalised-image statistics, labels in range)."""
    rng = np.random.default_rng(seed)
    local = config.batch_size // jax.process_count()
    batch = {
        "image": rng.standard_normal((local, *image_shape), dtype=np.float32),
        "label": rng.integers(0, NUM_CLASSES, size=(local,), dtype=np.int32),
    }
    return parallel.global_batch(batch, mesh)


def run_steps(compiled, state, batch, warmup: int, num_steps: int):
    """``(step times, last loss, all finite)``: warm-up steps, then each timed step alone.

    Each timed step waits for its result (``block_until_ready``), so a time is one step's
    dispatch + execution; the state is donated, so it is threaded through.
    """
    for _ in range(warmup):
        state, out = compiled(state, batch)
    jax.block_until_ready(state)
    times, finite = [], True
    for _ in range(num_steps):
        t0 = time.perf_counter()
        state, out = compiled(state, batch)
        jax.block_until_ready((state, out))
        times.append(time.perf_counter() - t0)
        finite &= bool(out[1])
    step_metrics, _ = jax.device_get(out)
    return times, float(step_metrics[metrics.TRAIN_LOSS]), finite


def time_train_step(shape: dict, dtype: str, num_steps: int, warmup: int, peak: float | None) -> dict:
    """Compile and time the training step at ``shape`` in ``dtype`` on every device."""
    devices = jax.devices()
    config = step_config(shape, shape["depth"], dtype, len(devices))
    image_shape = shape["image_shape"]
    report = aot.compile_train_step(config, devices, image_shape, NUM_CLASSES)
    print(f"   compiled in {report.compile_s:.1f} s", flush=True)
    mesh = parallel.create_mesh(len(devices))  # equal to the compiled program's mesh
    state = initial_state(config, mesh, image_shape)
    batch = random_batch(config, mesh, image_shape)
    times, loss, finite = run_steps(report.compiled, state, batch, warmup, num_steps)
    median = statistics.median(times)
    flops = report.model_flops * len(devices)  # the report's FLOPs are per device
    achieved = flops / median
    result = {
        "model": {"width": shape["width"], "depth": shape["depth"], "mask_mode": config.model.mask_mode},
        "dtype": dtype,
        "global_batch": config.batch_size,
        "image_shape": list(image_shape),
        "compile_s": report.compile_s,
        "warmup_steps": warmup,
        "step_times_s": times,
        "step_time_s": median,
        "images_per_s": config.batch_size / median,
        "flops_per_step": flops,
        "xla_flops_per_device": report.xla_flops,  # XLA counts the scan body once
        "achieved_flops_per_s": achieved,
        "mfu": achieved / (peak * len(devices)) if peak else None,
        # XLA's peak of live buffers; XLA:CPU's leaves out temporaries, so the sum of arguments,
        # outputs and temporaries (donated outputs counted twice: an upper bound) is kept as well.
        "compiled_peak_bytes_per_device": report.peak_bytes,
        "compiled_total_bytes_per_device": report.argument_bytes + report.output_bytes + report.temp_bytes,
        "compiled_temp_bytes_per_device": report.temp_bytes,
        "compiled_argument_bytes_per_device": report.argument_bytes,
        "host_callbacks": report.host_callbacks,
        "last_loss": loss,
        "finite": finite,
        **memory_stats(),
    }
    print(step_line(result), flush=True)
    return result


def step_line(r: dict) -> str:
    """One progress line for a ``step_time`` entry."""
    mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
    mib = {k: r[f"compiled_{k}_bytes_per_device"] / 2**20 for k in ("peak", "total")}
    return (
        f"   step {r['step_time_s'] * 1e3:.2f} ms (median of {len(r['step_times_s'])}), "
        f"{r['flops_per_step'] / 1e9:.2f} GFLOP/step, {r['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s, "
        f"MFU {mfu}; XLA memory per device: peak {mib['peak']:,.1f} MiB, total {mib['total']:,.1f} MiB"
    )


def compile_time(shape: dict, depth: int, timed: dict) -> dict:
    """Compile time (lower + compile) of the float32 training step at depth ``depth``.

    ``timed`` is the float32 ``step_time`` entry: when it is the same program (same K), its
    compile is reported instead of compiling again.
    """
    if depth == shape["depth"] and "compile_s" in timed:
        keys = ("global_batch", "compile_s", "compiled_peak_bytes_per_device", "flops_per_step")
        print(f"   K={depth}: {timed['compile_s']:.1f} s (the float32 step_time compile)", flush=True)
        return {
            "depth": depth,
            "width": shape["width"],
            **{k: timed[k] for k in keys},
            "from": "step_time.float32",
        }
    devices = jax.devices()
    config = step_config(shape, depth, "float32", len(devices))
    report = aot.compile_train_step(config, devices, shape["image_shape"], NUM_CLASSES)
    print(
        f"   K={depth}: {report.compile_s:.1f} s, peak {report.peak_bytes / 2**20:,.1f} MiB/device",
        flush=True,
    )
    return {
        "depth": depth,
        "width": shape["width"],
        "global_batch": config.batch_size,
        "compile_s": report.compile_s,
        "compiled_peak_bytes_per_device": report.peak_bytes,
        "flops_per_step": report.model_flops * len(devices),
    }


def training_config(args, small: bool):
    """``(config file, config)`` of the short real run: CIFAR-10 with ``--cifar_dir``, else digits."""
    if args.cifar_dir:
        width, epochs = (8, 1.0) if small else (PAPER["width"], args.cifar_epochs)
        path = CONFIGS / "cifar_resnet.py"
        config = config_schema.load_config_file(path, f"width={width},epochs={epochs}")
        config.data.data_dir = args.cifar_dir
        config.data.holdout = args.cifar_holdout
        config.eval_every_steps = 0  # one evaluation, at the end
        if small:  # a smoke run: 50 steps at the smoke shape, whatever the data size
            config.num_train_steps, config.batch_size = 50, SMALL["batch"]
    else:
        path = CONFIGS / "digits_quickstart.py"
        config = config_schema.load_config_file(path, "width=8,depth=2,epochs=2" if small else None)
    if small:  # CPU smoke run: skip the extras that cost compiles (accounting) or files
        config.accounting, config.tensorboard = False, False
    config.checkpoint_every_steps = 10**9  # only the final checkpoint: nothing to resume here
    config.progress = sys.stdout.isatty()  # no carriage-return progress lines in logs
    # The global batch must divide over the devices (the job checks it): round it up.
    config.batch_size = -(-config.batch_size // jax.device_count()) * jax.device_count()
    return path, config


def training_run(args, small: bool) -> dict:
    """A short run of the training job; its accuracy, eval split and wall time."""
    from wtjax.job import train  # imported here: it pulls in the data pipeline

    path, config = training_config(args, small)
    parent = Path(args.workdir) if args.workdir else None
    if parent:
        parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="accelerator_check_", dir=parent))  # always a fresh run
    try:
        summary = train.train_and_evaluate(config, workdir)
    finally:
        if parent is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "config": str(path.relative_to(ROOT)),
        "dataset": config.data.name,
        "width": config.model.width,
        "depth": config.model.depth,
        "epochs": config.num_epochs if config.num_train_steps is None else None,
        "global_batch": config.batch_size,
        "steps": summary["step"],
        "accuracy": summary[metrics.EVAL_ACCURACY],
        "eval_loss": summary[metrics.EVAL_LOSS],
        "eval_examples": summary[metrics.EVAL_COUNT],
        "eval_split": summary["eval_split"],
        "train_step_time_s": summary.get(metrics.STEP_TIME),
        "wall_time_s": summary["wall_time_s"],
        "workdir": str(workdir) if parent else None,
    }


def headline(data: dict) -> dict:
    """The numbers to read first, from the sections that succeeded (None where one failed)."""
    dev, steps_, comp = data.get("devices", {}), data.get("step_time", {}), data.get("compile_time", {})
    out = {"device": f"{dev.get('num_devices')} x {dev.get('device_kind')}", "peak": dev.get("peak_source")}
    for dtype in DTYPES:
        entry = steps_.get(dtype, {})
        out[f"{dtype}_step_ms"] = entry["step_time_s"] * 1e3 if "step_time_s" in entry else None
        out[f"{dtype}_mfu"] = entry.get("mfu")
        for name in ("peak", "total"):
            value = entry.get(f"compiled_{name}_bytes_per_device")
            out[f"{dtype}_compiled_{name}_mib"] = value / 2**20 if value is not None else None
    # Peak bytes in use since the start (None on CPU, which does not report it).
    peaks = [e["device_peak_bytes_in_use"] for e in steps_.values() if e.get("device_peak_bytes_in_use")]
    out["device_peak_mib"] = max(peaks) / 2**20 if peaks else None
    for depth in COMPILE_DEPTHS:
        out[f"compile_s_K{depth}"] = comp.get(f"K={depth}", {}).get("compile_s")
    run = data.get("training_run", {})
    out["train_accuracy"], out["train_eval_split"] = run.get("accuracy"), run.get("eval_split")
    out["train_wall_s"] = run.get("wall_time_s")
    return out


def main(argv=None) -> int:
    """Run every section; exit status 1 if any failed (the JSON has its traceback)."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    small = args.small if args.small is not None else jax.default_backend() == "cpu"
    shape = dict(SMALL if small else PAPER)
    num_steps = args.steps or shape["steps"]
    warmup = shape["warmup"] if args.warmup is None else args.warmup
    print(f"accelerator check ({'small' if small else 'paper'} shapes) -> {args.out}", flush=True)
    report = Report(
        args.out,
        {
            "script": "experiments/accelerator_check.py",
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "small": small,
            "shape": {
                **shape,
                "image_shape": list(shape["image_shape"]),
                "compile_depths": list(COMPILE_DEPTHS),
            },
            "args": vars(args),
        },
    )
    devices = report.run(("devices",), device_info)
    peak = devices.get("peak_flops_per_device")
    timed = {
        dtype: report.run(("step_time", dtype), time_train_step, shape, dtype, num_steps, warmup, peak)
        for dtype in DTYPES
    }
    for depth in COMPILE_DEPTHS:
        report.run(("compile_time", f"K={depth}"), compile_time, shape, depth, timed["float32"])
    if not args.skip_training:
        report.run(("training_run",), training_run, args, small)
    report.data["total_s"] = time.perf_counter() - t0
    report.data["headline"] = headline(report.data)
    report.save()
    print("\n" + json.dumps(report.data["headline"], indent=2), flush=True)
    print(f"\ndone in {report.data['total_s']:.0f} s; wrote {args.out}", flush=True)
    for name in report.data["errors"]:
        print(f"section {name} FAILED (traceback in the JSON)", flush=True)
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
