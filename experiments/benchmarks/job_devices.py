"""The training job's speed on CPU with one device vs one device per core, side by side.

Runs ``python -m wtjax.main`` in subprocesses, alternating the CPU device counts round by round
(``JAX_NUM_CPU_DEVICES``; unset = the job's default, one device per core), and reports the job's
own wall seconds per step and images/s (input pipeline included) over the timed intervals after
the first, and the last logged training loss (the runs must agree up to float reduction order).
``--devices=...,bare`` adds the bare training step of the same config (the job's jitted step on its
default mesh, one random batch already on the devices, no input pipeline, no logging), timed in
this process between the job runs: the job's images/s should be no worse.

    python -m experiments.benchmarks.job_devices --data_dir=/tmp/cifar10/train --steps=60 --rounds=2
    python -m experiments.benchmarks.job_devices --data_dir=/tmp/cifar10/train --devices=auto,bare
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wtjax.job import metrics
from wtjax.job.config import load_config_file


def run_job(args, devices: str, workdir: Path) -> dict:
    """One job run; ``devices``: a ``JAX_NUM_CPU_DEVICES`` value, or ``'auto'`` (the job's default)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    if devices != "auto":
        env["JAX_NUM_CPU_DEVICES"] = devices
    cmd = [
        sys.executable, "-m", "wtjax.main", f"--config={args.config}", f"--workdir={workdir}",
        f"--config.data.data_dir={args.data_dir}", "--config.data.holdout=5000",
        f"--config.num_train_steps={args.steps}", f"--config.log_every_steps={args.log_every}",
        "--config.eval_every_steps=0", "--config.accounting=False", "--config.progress=False",
        "--config.tensorboard=False", f"--config.checkpoint_every_steps={10 * args.steps}",
    ]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if metrics.STEP_TIME in r][1:]  # the first interval holds the compile
    return {
        "step_s": statistics.mean(r[metrics.STEP_TIME] for r in train),
        "images_s": statistics.mean(r[metrics.IMAGES_PER_SEC] for r in train),
        "loss": train[-1][metrics.TRAIN_LOSS],
    }


def bare_step(args) -> dict:
    """The config's jitted training step alone: seconds per step and images/s over ``args.steps``."""
    from wtjax.job import parallel

    config = load_config_file(*args.config.split(":", 1))
    parallel.use_cpu_cores((config.batch_size,))  # the job's default device count
    import jax
    import numpy as np

    from wtjax.job import optim, steps
    from wtjax.job.config import model_from_config

    model = model_from_config(config.model, 10)
    tx, schedule = optim.create_optimizer(config.optim, total_steps=args.steps, steps_per_epoch=args.steps)
    mesh, key = parallel.create_mesh(), jax.random.PRNGKey(0)
    state = jax.jit(
        steps.make_init_state(model, tx, (32, 32, 3), key), out_shardings=parallel.replicated(mesh)
    )()
    step = parallel.jit_train_step(steps.make_train_step(model, tx, schedule, key), mesh)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((config.batch_size, 32, 32, 3), np.float32),
        "label": rng.integers(0, 10, config.batch_size).astype(np.int32),
    }
    batch = jax.device_put(batch, parallel.batch_sharded(mesh))
    state, (out, _) = step(state, batch)  # compile
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, (out, _) = step(state, batch)
    loss = float(out[metrics.TRAIN_LOSS])
    step_s = (time.perf_counter() - t0) / args.steps
    return {"step_s": step_s, "images_s": config.batch_size / step_s, "loss": loss}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cifar_resnet.py:width=32,depth=4")
    parser.add_argument("--data_dir", required=True, help="class-folder CIFAR-10 train split")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log_every", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--devices",
        default="1,auto",
        help="comma-separated JAX_NUM_CPU_DEVICES values, 'auto' or 'bare' (module docstring)",
    )
    args = parser.parse_args(argv)
    results = {d: [] for d in args.devices.split(",")}
    for r in range(args.rounds):
        order = list(results) if r % 2 == 0 else list(results)[::-1]
        for devices in order:
            if devices == "bare":
                results[devices].append(bare_step(args))
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    results[devices].append(run_job(args, devices, Path(tmp)))
            print(f"round {r} devices={devices}: {results[devices][-1]}", flush=True)
    print(f"\n{args.config}, {args.steps} steps, {os.cpu_count()} cores\n")
    print("| devices | s/step | images/s | last train loss |\n|---|---|---|---|")
    for devices, runs in results.items():
        steps = ", ".join(f"{x['step_s']:.2f}" for x in runs)
        images = ", ".join(f"{x['images_s']:.0f}" for x in runs)
        losses = ", ".join(f"{x['loss']:.4f}" for x in runs)
        print(f"| {devices} | {steps} | {images} | {losses} |")


if __name__ == "__main__":
    main()
