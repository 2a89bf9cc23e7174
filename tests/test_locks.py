"""The workdir lock (wtjax/job/workdir_lock.py): one live job per workdir, free again when its owner
dies (kill -9 included), exactly one winner among concurrent claimants, re-entrant for the sweep."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from train_utils import HOLD_LOCK, ROOT, hold_lock, load_config, run_main, subprocess_env

from wtjax.job import workdir_lock
from wtjax.job.train import train_and_evaluate


@pytest.fixture
def holder(tmp_path):
    proc = hold_lock(tmp_path)
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_job_on_a_live_workdir_is_refused_at_once(tmp_path, holder):
    config = load_config("tiny", num_devices=1, tensorboard=False)
    t0 = time.perf_counter()
    with pytest.raises(workdir_lock.WorkdirLocked) as info:
        train_and_evaluate(config, tmp_path)
    message = str(info.value)
    assert f"process {holder.pid} on host {socket.gethostname()}" in message and "\n" not in message
    assert time.perf_counter() - t0 < 10  # no data, model or compile first
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_the_command_refuses_a_live_workdir_in_one_line(tmp_path, holder):
    proc = run_main(["--config=configs/tiny.py", f"--workdir={tmp_path}"], timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"wtjax: workdir {tmp_path} is in use by process {holder.pid} on host {socket.gethostname()} "
        "(lock .wtjax.lock): wait for that job to end or stop it, or use another workdir"
    )


def test_the_lock_of_a_killed_owner_is_free_and_a_failed_job_releases_its_own(tmp_path, holder):
    assert workdir_lock.try_acquire(tmp_path) is None
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with workdir_lock.acquire(tmp_path):  # the kernel released it: nothing stale to take over
        assert hold_fails(tmp_path)
    # A job that raised after locking the workdir has released its lock.
    config = load_config("tiny", num_devices=1, tensorboard=False, batch_size=128)
    with pytest.raises(ValueError, match="exceeds the 64 training examples"):
        train_and_evaluate(config, tmp_path)
    proc = hold_lock(tmp_path)
    proc.kill()
    proc.wait()


def hold_fails(workdir) -> bool:
    """Whether another process is refused the lock of ``workdir`` (its one-line error names us)."""
    proc = subprocess.run(
        [sys.executable, "-c", HOLD_LOCK, workdir_lock.__file__, str(workdir)], capture_output=True, text=True
    )
    return proc.returncode != 0 and f"process {os.getpid()} on host" in proc.stderr


def test_the_lock_is_reentrant_in_its_thread_only(tmp_path):
    outer = workdir_lock.acquire(tmp_path)
    inner = workdir_lock.acquire(tmp_path / ".")  # the sweep's hold, then its job's
    other = []
    thread = threading.Thread(target=lambda: other.append(workdir_lock.try_acquire(tmp_path)))
    thread.start()
    thread.join()
    assert other == [None]
    inner.release()
    inner.release()  # idempotent: the outer hold stays
    assert hold_fails(tmp_path)
    outer.release()
    workdir_lock.acquire(tmp_path).release()


# Locks the workdir, forks a child that outlives it (e.g. a data worker), then dies by kill -9.
FORK_THEN_DIE = textwrap.dedent(
    """
    import importlib.util, os, signal, sys, time
    spec = importlib.util.spec_from_file_location("workdir_lock", sys.argv[1])
    module = sys.modules["workdir_lock"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lock = module.acquire(sys.argv[2])
    if os.fork() == 0:  # the fork hooks have run when fork returns
        os.write(1, b"child\\n")  # one write each: the two lines cannot interleave
        time.sleep(600)
    os.write(1, b"parent\\n")
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_forked_child_does_not_keep_a_dead_owners_lock(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", FORK_THEN_DIE, workdir_lock.__file__, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the child's group, to end it
    )
    try:
        assert {proc.stdout.readline().strip() for _ in range(2)} == {"child", "parent"}
        proc.wait()
        lock = workdir_lock.try_acquire(tmp_path)  # the child still runs, without the lock
        assert lock is not None
        lock.release()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_an_unlockable_filesystem_is_a_clear_error(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(OSError, match=r"cannot lock .*\.wtjax\.lock: No locks available; .*flock"):
        workdir_lock.acquire(tmp_path)


# One process of a two-process job (tests/test_train_parallel.py's set-up).
JOB_PROCESS = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 1)
    from train_utils import load_config
    from wtjax.job.train import train_and_evaluate

    config = load_config(
        "tiny", None, tensorboard=False,
        **{"distributed.coordinator_address": sys.argv[2], "distributed.num_processes": 2,
           "distributed.process_id": int(sys.argv[1])},
    )
    train_and_evaluate(config, sys.argv[3])
    """
)


def test_every_process_of_a_multi_process_job_stops_when_process_0_is_refused(tmp_path, holder):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = subprocess_env(PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{subprocess_env()['PYTHONPATH']}")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", JOB_PROCESS, str(i), address, str(tmp_path)],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        errors = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode != 0 for p in procs)
    assert f"WorkdirLocked: workdir {tmp_path} is in use by process {holder.pid}" in errors[0]
    assert "(process 0 was refused its lock)" in errors[1]


# Many `sweep run` processes claim one run whose workdir holds a stale lock of a dead process; each
# claimant reports whether it won, and the winner holds its lock until every claimant has tried.
CLAIMANTS = textwrap.dedent(
    """
    import multiprocessing as mp, socket, subprocess, sys
    from pathlib import Path
    from wtjax.tools import sweep

    def claim(workdir, start, tried, wins):
        start.wait()
        lock = sweep._claim(Path(workdir))
        with wins.get_lock():
            wins.value += bool(lock)
        tried.wait()

    if __name__ == "__main__":
        root, trials, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
        dead = subprocess.Popen(["true"])
        dead.wait()
        ctx = mp.get_context("fork")  # cheap children; this driver never started jax
        winners = []
        for t in range(trials):
            workdir = root / str(t)
            workdir.mkdir()
            (workdir / sweep.LOCK).write_text(f"{socket.gethostname()} {dead.pid}")
            start, tried, wins = ctx.Barrier(n), ctx.Barrier(n), ctx.Value("i", 0)
            procs = [ctx.Process(target=claim, args=(str(workdir), start, tried, wins)) for _ in range(n)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(60)
            winners.append(wins.value)
        print(winners)
    """
)


def test_exactly_one_of_many_concurrent_claimants_wins(tmp_path):
    driver = tmp_path / "claimants.py"
    driver.write_text(CLAIMANTS)
    runs = tmp_path / "runs"
    runs.mkdir()
    proc = subprocess.run(
        [sys.executable, str(driver), str(runs), "30", "12"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str([1] * 30)


@pytest.mark.parametrize("url", ["gs://bucket/run", "s3://bucket/run", "file:///tmp/run"])
def test_a_url_workdir_is_refused_not_made_a_local_folder(tmp_path, monkeypatch, url):
    """``--workdir=gs://bucket/run`` used to create the local folder ``gs:/bucket/run``."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(workdir_lock.UnsupportedWorkdir, match=r"is a \w+:// URL.*mounted path"):
        train_and_evaluate(load_config("tiny"), url)
    assert list(tmp_path.iterdir()) == []
