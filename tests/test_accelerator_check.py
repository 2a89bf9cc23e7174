"""experiments/accelerator_check.py works on CPU (small shapes) before an accelerator is ever lent.

Run as the check is documented: ``python -m experiments.accelerator_check`` from the repository root.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from train_utils import ROOT, subprocess_env

from experiments import accelerator_check


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("cpu", None),
        ("some future chip", None),
    ],
)
def test_peak_table(kind, peak):
    found = accelerator_check.peak_for(kind)
    assert (found and found["peak_flops_per_device"]) == peak
    if found:
        assert found["peak_source"]


def test_small_run_on_cpu(tmp_path):
    """The whole check in --small mode on 2 CPU devices: every section present and sane."""
    out = tmp_path / "check.json"
    # Two CPU devices exercise the data-parallel path (batch split, replicated state).
    env = subprocess_env(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=2)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.accelerator_check",
            "--small",
            f"--out={out}",
            f"--workdir={tmp_path / 'runs'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    assert report["small"] is True

    devices = report["devices"]
    assert devices["platform"] == "cpu" and devices["num_devices"] == 2
    assert devices["peak_flops_per_device"] is None  # unknown chip: no MFU

    for dtype in ("float32", "bfloat16"):
        step = report["step_time"][dtype]
        assert step["dtype"] == dtype
        assert step["step_time_s"] > 0 and all(t > 0 for t in step["step_times_s"])
        assert step["compile_s"] > 0 and step["flops_per_step"] > 0
        assert step["achieved_flops_per_s"] > 0 and step["mfu"] is None
        assert step["compiled_peak_bytes_per_device"] > 0
        assert step["finite"] and step["global_batch"] % 2 == 0
    # The bf16 step's FLOPs are the float32 step's: same program shape, other dtype.
    assert (
        report["step_time"]["bfloat16"]["flops_per_step"] == report["step_time"]["float32"]["flops_per_step"]
    )

    compile_times = report["compile_time"]
    assert set(compile_times) == {"K=4", "K=32"}
    assert all(compile_times[k]["compile_s"] > 0 for k in compile_times)
    # Scans are counted K times, so K=32 has about 8x the FLOPs of K=4 (stem and head aside).
    assert compile_times["K=32"]["flops_per_step"] > 4 * compile_times["K=4"]["flops_per_step"]

    run = report["training_run"]
    assert run["dataset"] == "digits" and run["steps"] > 0
    assert 0.0 <= run["accuracy"] <= 1.0 and run["eval_examples"] > 0
    assert run["eval_split"] and run["wall_time_s"] > 0
    assert report["total_s"] > 0
    headline = report["headline"]
    assert headline["float32_step_ms"] > 0 and headline["bfloat16_step_ms"] > 0
    assert headline["compile_s_K32"] > 0 and headline["train_accuracy"] == run["accuracy"]
