"""Preemption: SIGTERM makes the job save the step it reached and exit 0; rerunning finishes it.

``python -m wtjax.main`` runs in a subprocess and gets SIGTERM once its first step is logged (the
single-process path of ``wtjax/job/preemption.py``: a Python handler sets a flag read every step).
The resumed run must end with parameters bitwise equal to an uninterrupted run of the same
command (run meanwhile, in the same kind of process).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from train_utils import (
    ROOT,
    assert_trees_equal,
    cache_env,
    checkpoint_steps,
    read_params,
    run_main,
    subprocess_env,
)

from wtjax.job import preemption

STEPS = 200  # ~1 s of training after compilation: the signal arrives long before the end
FLAGS = [
    f"--config=configs/tiny.py:steps={STEPS}",
    "--config.checkpoint_every_steps=50",
    "--config.log_every_steps=10",
    "--config.tensorboard=False",
]


def _main(workdir, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "wtjax.main", *FLAGS, f"--workdir={workdir}"],
        cwd=ROOT,
        env=env or subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_saves_the_step_reached_exits_0_and_the_rerun_matches(tmp_path):
    preempted, reference = tmp_path / "preempted", tmp_path / "straight"
    # The preempted run compiles into a persistent cache; the rerun and the reference load the
    # same programs from it (two compilations saved; as in test_train_kill.py, bitwise equality
    # then still compares one program's results).
    cached = subprocess_env(**cache_env(tmp_path / "xla_cache"))
    proc = _main(preempted, cached)
    straight = None
    try:
        first_record = preempted / "metrics.jsonl"  # written after the first (compiled) step
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if first_record.exists() and first_record.stat().st_size:
                break
            time.sleep(0.005)
        straight = _main(reference, cached)  # the uninterrupted run, alongside from here on
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        line = next(x for x in out.splitlines() if x.startswith("preempted at step"))
        step = int(line.split()[3].rstrip(":"))
        assert 1 <= step < STEPS, "the run finished before it was preempted"
        assert max(checkpoint_steps(preempted)) == step  # saved although not a periodic step (50)
        assert not [p for p in (preempted / "checkpoints").iterdir() if "tmp" in p.name]
        assert not (preempted / "summary.json").exists()

        rerun = run_main([*FLAGS, f"--workdir={preempted}"], timeout=300, env=cached)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"resumed from checkpoint at step {step}" in rerun.stdout
        _, straight_err = straight.communicate(timeout=300)
        assert straight.returncode == 0, straight_err[-3000:]
    finally:
        for p in (proc, straight):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert_trees_equal(read_params(preempted, STEPS), read_params(reference, STEPS))


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread")
def test_watch_sets_a_flag_on_sigterm_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    sync_point = {3}  # orbax's multi-process sync point, faked: reached at step 3
    with preemption.PreemptionWatch(lambda s: s in sync_point) as watch:
        assert not watch.reached(1) and watch.reached(3)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the Python-level handler runs at the next bytecode boundary
        assert watch.reached(1)
    assert signal.getsignal(signal.SIGTERM) == before
