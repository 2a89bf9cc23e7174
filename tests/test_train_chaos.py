"""Chaos: SIGKILL at random moments over several runs, then a damaged newest checkpoint.

``python -m wtjax.main`` runs in a subprocess, killed in each cycle at a random moment: while a
random checkpoint is being written (its orbax tmp directory exists) or a random delay after one
is complete (training, evaluating, deleting old steps). Each rerun must resume from the newest
complete checkpoint. Then the newest checkpoint gets eight garbage bytes: the next run must reject
it, say so, and resume from the one before. The finished run's parameters must be bitwise equal
to an uninterrupted run of the same command.

The kill plan comes from a seed printed at the start (``WTJAX_CHAOS_SEED=<seed>`` repeats it;
the kill moments themselves still depend on timing).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from train_utils import (
    ROOT,
    assert_trees_equal,
    cache_env,
    checkpoint_steps,
    read_params,
    run_main,
    subprocess_env,
)

STEPS, EVERY, KILLS = 40, 4, 3
LAST_TARGET = STEPS - 2 * EVERY
FLAGS = [
    f"--config=configs/tiny.py:steps={STEPS}",
    f"--config.checkpoint_every_steps={EVERY}",
    "--config.keep_checkpoints=2",
    "--config.log_every_steps=4",
    "--config.tensorboard=False",
]


def _triggered(ckpts: Path, step: int, during_save: bool) -> bool:
    """Checkpoint ``step`` is being written (``during_save``) or is complete."""
    if not ckpts.is_dir():
        return False
    names = os.listdir(ckpts)
    if during_save:
        return any(n.startswith(f"{step}.orbax-checkpoint-tmp") for n in names)
    return str(step) in names


def _run_and_kill(workdir: Path, env: dict, step: int, during_save: bool, delay: float, log: Path):
    """Run the job; SIGKILL it ``delay`` s after the trigger. Its return code (0: it finished)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wtjax.main", *FLAGS, f"--workdir={workdir}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline, restored = time.time() + 120, False
        try:
            while proc.poll() is None and time.time() < deadline:
                # Armed once the run has restored (and orbax has removed a killed save's tmp dir).
                restored = restored or "model: " in log.read_text()
                if restored and _triggered(workdir / "checkpoints", step, during_save):
                    time.sleep(delay)
                    break
                time.sleep(0.001)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    return proc.returncode


def _corrupt_newest(workdir: Path) -> tuple[int, int]:
    """Eight garbage bytes in the newest checkpoint's largest file: ``(newest, previous)``."""
    newest, previous = checkpoint_steps(workdir)[-1], checkpoint_steps(workdir)[-2]
    files = [p for p in (workdir / "checkpoints" / str(newest) / "default").rglob("*") if p.is_file()]
    path = max(files, key=lambda p: p.stat().st_size)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\xff" * 8)
    return newest, previous


def _listing(workdir: Path) -> list[str]:
    ckpts = workdir / "checkpoints"
    return sorted(os.listdir(ckpts)) if ckpts.is_dir() else []


def _resumed_from(log_text: str, complete: list[int]) -> bool:
    if not complete:
        return "initialised from the seed" in log_text
    return f"resumed from checkpoint at step {max(complete)}" in log_text


def _main(workdir: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "wtjax.main", *FLAGS, f"--workdir={workdir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_cycles(workdir: Path, env: dict, rng: random.Random, seed: int, logs: Path, compiled) -> int:
    """Up to KILLS runs, each killed at a random moment after the newest checkpoint; the kills.

    ``compiled()`` is called once the first run has filled the compilation cache.
    """
    kills = 0
    for cycle in range(KILLS + 2):  # a cycle may end before its trigger (then not counted)
        complete = checkpoint_steps(workdir)
        start = max(complete, default=0)
        if kills == KILLS or start >= LAST_TARGET:
            break
        # A checkpoint still to come, at least two once killed during a save (so that two complete
        # ones exist after two kills), leaving steps to train after it (so the kill comes first).
        during_save, delay = rng.random() < 0.5, rng.uniform(0.0, 0.05)
        step = min(start + EVERY * (2 if during_save else rng.randint(1, 2)), LAST_TARGET)
        moment = f"seed {seed}, cycle {cycle}: kill {'during' if during_save else 'after'} save {step}"
        log = logs / f"cycle{cycle}.log"
        code = _run_and_kill(workdir, env, step, during_save, delay, log)
        outcome = "killed" if code else "finished first"
        print(f"{moment} + {delay * 1000:.0f} ms: {outcome}, left {_listing(workdir)}")
        assert code in (-signal.SIGKILL, 0), f"{moment}: exit code {code}\n{log.read_text()[-3000:]}"
        assert _resumed_from(log.read_text(), complete), f"{moment}: not resumed from {complete}"
        kills += code != 0
        if cycle == 0:
            compiled()
    return kills


def test_random_kills_and_a_damaged_checkpoint_end_as_an_uninterrupted_run(tmp_path):
    seed = int(os.environ.get("WTJAX_CHAOS_SEED") or random.randrange(2**31))
    print(f"chaos seed {seed} (WTJAX_CHAOS_SEED={seed} repeats the kill plan)")
    rng = random.Random(seed)
    env = subprocess_env(**cache_env(tmp_path / "xla_cache"))
    workdir, reference = tmp_path / "chaos", tmp_path / "straight"
    # The uninterrupted reference: the same command, run meanwhile once the first run compiled
    # (the same executables then, so bitwise equality compares one program's results).
    straight = []
    try:
        kills = _kill_cycles(
            workdir, env, rng, seed, tmp_path, lambda: straight.append(_main(reference, env))
        )
        assert kills == KILLS, f"seed {seed}: only {kills} kills"
        assert checkpoint_steps(workdir)[-1] < STEPS

        newest, previous = _corrupt_newest(workdir)
        rerun = run_main([*FLAGS, f"--workdir={workdir}"], timeout=300, env=env)
        assert rerun.returncode == 0, f"seed {seed}\n{rerun.stdout[-2000:]}{rerun.stderr[-3000:]}"
        assert f"checkpoint {workdir / 'checkpoints' / str(newest)} rejected" in rerun.stdout
        assert f"resumed from checkpoint at step {previous}" in rerun.stdout
        assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
        _, err = straight[0].communicate(timeout=300)
        assert straight[0].returncode == 0, err[-3000:]
    finally:
        for proc in straight:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert_trees_equal(read_params(workdir, STEPS), read_params(reference, STEPS))
