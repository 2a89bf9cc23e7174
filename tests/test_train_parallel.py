"""Data parallelism: 1 device == 4 fake CPU devices, and a 2-process (multi-host) run on localhost.

The global batch and the data order do not depend on the device or process count, so the runs
differ only by the order of floating-point reductions (compared with a tolerance).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from train_utils import ROOT, assert_trees_equal, compilation_cache, load_config, read_params, subprocess_env

from wtjax.job.train import train_and_evaluate

RTOL, ATOL = 2e-4, 2e-5


def tiny(**overrides):
    return load_config("tiny", None, tensorboard=False, **overrides)


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    with compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        result = train_and_evaluate(tiny(num_devices=1), workdir)
    return workdir, result


def test_four_devices_match_one_device(tmp_path, single_device_run):
    one_dir, one = single_device_run
    four = train_and_evaluate(tiny(num_devices=4), tmp_path)
    assert_trees_equal(read_params(tmp_path), read_params(one_dir), rtol=RTOL, atol=ATOL)
    assert four["eval/accuracy"] == pytest.approx(one["eval/accuracy"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


WORKER = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 1)
    sys.path.insert(0, {tests!r})
    from train_utils import load_config
    from wtjax.job.train import train_and_evaluate

    process_id = int(sys.argv[1])
    config = load_config(
        "tiny", None, tensorboard=False,
        **{{"distributed.coordinator_address": "localhost:{port}", "distributed.num_processes": 2,
           "distributed.process_id": process_id}},
    )
    result = train_and_evaluate(config, {workdir!r})
    assert jax.process_count() == 2 and len(jax.devices()) == 2
    print("RESULT", process_id, result["eval/accuracy"], result["eval/num_examples"])
    """
)


def test_two_processes_match_one_process(tmp_path, single_device_run):
    one_dir, one = single_device_run
    workdir = tmp_path / "two_process"
    script = WORKER.format(tests=str(ROOT / "tests"), port=_free_port(), workdir=str(workdir))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(i)],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=400))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [line.split() for out, _ in outputs for line in out.splitlines() if line.startswith("RESULT")]
    assert len(results) == 2
    for _, _, accuracy, count in results:  # both processes report the same global evaluation
        assert float(accuracy) == pytest.approx(one["eval/accuracy"])
        assert float(count) == one["eval/num_examples"]
    assert_trees_equal(read_params(workdir), read_params(one_dir), rtol=RTOL, atol=ATOL)


def _devices_after_use_cpu_cores(batch_sizes, code_before="", **env) -> list:
    code = textwrap.dedent(
        f"""
        import json, jax
        from wtjax.job import parallel
        {code_before}
        count = parallel.use_cpu_cores({batch_sizes!r})
        print(json.dumps([count, len(jax.devices("cpu"))]))
        """
    )
    child_env = subprocess_env(**env)
    if "JAX_NUM_CPU_DEVICES" not in env:
        del child_env["JAX_NUM_CPU_DEVICES"]  # the library's default, not the tests' one device
    out = subprocess.run(
        [sys.executable, "-c", code], env=child_env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_job_uses_one_cpu_device_per_core_unless_told_otherwise():
    cores = len(os.sched_getaffinity(0))
    expected = max(d for d in range(1, cores + 1) if 12 % d == 0 and 8 % d == 0)
    assert _devices_after_use_cpu_cores((12, 8)) == [expected, expected]
    prime = 7 if cores >= 7 else 1  # a prime batch: one device unless there are as many cores
    assert _devices_after_use_cpu_cores((7,)) == [prime, prime]
    # The user's choice wins; after a computation the backends are fixed and nothing changes.
    assert _devices_after_use_cpu_cores((12,), JAX_NUM_CPU_DEVICES=3) == [None, 3]
    assert _devices_after_use_cpu_cores((12,), "jax.numpy.ones(1).block_until_ready()") == [None, 1]
