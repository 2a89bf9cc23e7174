"""The training job's speed on CPU with one device vs one device per core, side by side.

Runs ``python -m wtjax.main`` in subprocesses, alternating the CPU device counts round by round
(``JAX_NUM_CPU_DEVICES``; unset = the job's default, one device per core), and reports the job's
own wall seconds per step and images/s (input pipeline included) over the timed intervals after
the first, and the last logged training loss (the runs must agree up to float reduction order).

    python -m experiments.benchmarks.job_devices --data_dir=/tmp/cifar10/train --steps=60 --rounds=2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from wtjax.job import metrics


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cifar_resnet.py:width=32,depth=4")
    parser.add_argument("--data_dir", required=True, help="class-folder CIFAR-10 train split")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log_every", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--devices", default="1,auto", help="comma-separated JAX_NUM_CPU_DEVICES values")
    args = parser.parse_args(argv)
    results = {d: [] for d in args.devices.split(",")}
    for r in range(args.rounds):
        order = list(results) if r % 2 == 0 else list(results)[::-1]
        for devices in order:
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
