"""A run killed (SIGKILL) in the middle of writing a checkpoint resumes to the same parameters.

The job runs as ``python -m wtjax.main`` in a subprocess, killed as soon as an orbax tmp
directory of a later checkpoint appears; rerunning the same command must end with parameters
bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from train_utils import (
    ROOT,
    assert_trees_equal,
    cache_env,
    checkpoint_steps,
    read_params,
    run_main,
    subprocess_env,
)

STEPS, EVERY = 40, 10
FLAGS = [
    f"--config=configs/tiny.py:steps={STEPS}",
    f"--config.checkpoint_every_steps={EVERY}",
    "--config.keep_checkpoints=5",
    "--config.log_every_steps=10",
    "--config.tensorboard=False",
    "--jax_platforms=cpu",  # JAX's own flags are accepted (jax.config.config_with_absl)
]


def test_kill_mid_save_then_rerun_matches_uninterrupted(tmp_path):
    # The three runs compile the same programs: the first compiles them into a shared persistent
    # cache and the rerun and the reference load them (the same executables, so bitwise equality
    # still compares one program's results), which saves two compilations.
    env = subprocess_env(**cache_env(tmp_path / "xla_cache"))
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wtjax.main", *FLAGS, f"--workdir={workdir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = workdir / "checkpoints"
    deadline = time.time() + 300
    try:
        # Wait until checkpoint EVERY is complete and the next save is under way.
        while time.time() < deadline and proc.poll() is None:
            if (ckpts / str(EVERY)).is_dir() and any(
                p.name.startswith(f"{2 * EVERY}.") for p in ckpts.iterdir()
            ):
                break
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    complete = checkpoint_steps(workdir)
    assert complete and max(complete) < STEPS

    rerun = run_main([*FLAGS, f"--workdir={workdir}"], timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from checkpoint at step {max(complete)}" in rerun.stdout
    assert not [p for p in ckpts.iterdir() if "tmp" in p.name]

    # The uninterrupted reference is the same command in the same kind of process: bitwise
    # equality is a promise about one program on one machine configuration (XLA:CPU's thread
    # partitioning of reductions can differ between processes with different device counts).
    reference = tmp_path / "straight"
    straight = run_main([*FLAGS, f"--workdir={reference}"], timeout=300, env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_trees_equal(read_params(workdir, STEPS), read_params(reference, STEPS))
