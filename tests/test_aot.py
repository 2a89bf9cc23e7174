"""The training step compiles for real accelerator targets, without the accelerators.

Deviceless ahead-of-time compilation (:mod:`wtjax.tools.aot`) for a TPU v5e slice (libtpu) and 8 H100s
(the jax-cuda12 plugin and an XLA target config). Shapes are small so the suite stays fast; the
paper-shape matrix of every family is ``experiments/benchmarks/aot_matrix.py``. The tests skip
when the compilers are not installed, unless ``WTJAX_REQUIRE_AOT=1`` (CI) makes that a failure.
"""

import importlib.util
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from train_utils import load_config

from wtjax.job import parallel
from wtjax.tools import aot

H100 = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "targets" / "h100_sxm.pbtxt"
CIFAR = ((32, 32, 3), 10)


def _require(module: str):
    if importlib.util.find_spec(module) is None:
        if os.environ.get("WTJAX_REQUIRE_AOT") == "1":
            pytest.fail(f"{module} is not installed but WTJAX_REQUIRE_AOT=1: pip install -e '.[aot]'")
        pytest.skip(f"{module} not installed (pip install -e '.[aot]')")


@pytest.fixture(autouse=True)
def full_optimisation(monkeypatch):
    """Compile as users do: the suite's cheap CPU compilation mode (conftest.py) is off here, so
    memory analyses and programs are those of the default compiler (children inherit it)."""
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="module")
def tpu():
    _require("libtpu")
    return aot.tpu_devices("v5e:2x4", (2, 4, 1))


@pytest.fixture(scope="module")
def gpu():
    _require("jax_plugins.xla_cuda12")
    return aot.gpu_devices(H100, "1x1x8")


def _resnet(arg="width=16,depth=4", batch=64, **model):
    config = load_config("cifar_resnet", arg, batch_size=batch)
    for k, v in model.items():
        config.model[k] = v
    return config


def test_resnet_like_step_compiles_for_tpu_v5e_8(tpu):
    report = aot.compile_train_step(_resnet(), tpu, *CIFAR)
    assert (report.platform, report.device_kind, report.num_devices) == ("tpu", "TPU v5 lite", 8)
    assert report.host_callbacks == []
    assert 0 < report.peak_bytes < 16 * 2**30
    # XLA counts the scan body once; jaxpr_flops counts it K=4 times: more, but the same order.
    assert report.xla_flops < report.model_flops < 4 * report.xla_flops


def _im2col_kernel_grads(impl: str, devices) -> int:
    """How many im2col kernel gradients (the input seen as ``(Ci, H, W, N)``: a transpose with
    dims [3, 1, 2, 0]) the step's program lowered for ``devices`` contains."""
    mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
    step, args = aot.abstract_step_args(_resnet(batch=16, conv_impl=impl, unroll=1), mesh, *CIFAR)
    text = parallel.jit_train_step(step, mesh).lower(*args).as_text()
    return len(re.findall(r"dims = \[3, 1, 2, 0\]", text))


def test_auto_convolutions_follow_the_target_not_the_host(tpu, gpu):
    """On a CPU host, 'auto' lowers to XLA's native convolutions for TPU and GPU targets and to the
    im2col workaround for CPU (3 tied/stem convs in a scanned program: 3 kernel gradients)."""
    assert _im2col_kernel_grads("im2col", tpu) == 3
    assert _im2col_kernel_grads("auto", tpu) == _im2col_kernel_grads("auto", gpu) == 0
    assert _im2col_kernel_grads("auto", jax.devices()[:1]) == 3
    report = aot.compile_train_step(_resnet(batch=16), gpu, *CIFAR)
    assert report.platform == "gpu" and report.host_callbacks == []
    assert report.peak_bytes < 80e9  # the GPU compiler does not refuse what does not fit: check


def test_accelerator_programs_keep_the_scan_on_a_cpu_host(tpu):
    """The families' default unroll follows the target: a TPU program keeps the tie's while loop
    although the host (CPU) would unroll this shallow tie."""

    def whiles(devices, **model):  # mask generation has loops of its own: compare with a real scan
        mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
        step, args = aot.abstract_step_args(_resnet(batch=16, **model), mesh, *CIFAR)
        return parallel.jit_train_step(step, mesh).lower(*args).as_text().count("stablehlo.while")

    assert whiles(tpu) == whiles(tpu, unroll=1)
    host = jax.devices()[:1]
    assert whiles(host) < whiles(host, unroll=1)


def test_sqrt_checkpointing_keeps_memory_flat_in_depth(tpu):
    """The issue's goal, at a smaller shape: peak memory at K=32 within 3x of K=4 (measured at
    width 64, batch 128 in accelerators.md); storing every reuse grows ~linearly instead.

    Width 16, batch 16 (was 32, 64: the TPU compiles take half as long) still shows both effects
    clearly: measured sqrt32/sqrt4 = 1.22 (1.29 at 32/64) and plain32/sqrt32 = 6.5 (12.9)."""

    def peak(depth, **model):
        return aot.compile_train_step(_resnet(f"width=16,depth={depth}", 16, **model), tpu, *CIFAR).peak_bytes

    sqrt4, sqrt32 = peak(4, checkpoint_every="sqrt"), peak(32, checkpoint_every="sqrt")
    assert sqrt32 <= 3 * sqrt4
    assert peak(32) > 4 * sqrt32


def test_two_host_slice_feeds_each_process_its_own_rows(tpu):
    """v5e:4x4 over 2 hosts: each process's devices hold one contiguous block of the global batch,
    the block the input pipeline gives that process (``process_index * local``), and the step compiles."""
    devices = aot.tpu_devices("v5e:4x4", (2, 4, 1))
    assert sorted({d.process_index for d in devices}) == [0, 1] and len(devices) == 16
    mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
    batch = 128
    local = batch // 2
    rows = {0: set(), 1: set()}
    for device, index in parallel.batch_sharded(mesh).devices_indices_map((batch, 32, 32, 3)).items():
        rows[device.process_index].update(range(*index[0].indices(batch)))
    for process in (0, 1):
        assert rows[process] == set(range(process * local, (process + 1) * local))
    report = aot.compile_train_step(_resnet(batch=batch), devices, *CIFAR)
    assert report.num_processes == 2 and report.host_callbacks == []


def test_jaxpr_flops_counts_every_reuse_like_the_unrolled_program():
    """On CPU: the scanned step's jaxpr FLOPs equal XLA's count of the unrolled program's convs/dots."""
    config = _resnet("width=8,depth=3", 8)
    config.model.unroll = 1  # a real scan (the CPU default would unroll this shallow tie)
    mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
    scanned = aot.jaxpr_flops(*_step_and_args(config, mesh))
    config.model.scan = False
    unrolled = aot.jaxpr_flops(*_step_and_args(config, mesh))
    assert scanned == pytest.approx(unrolled, rel=1e-9)
    config.model.depth = 1
    one = aot.jaxpr_flops(*_step_and_args(config, mesh))
    assert 2.5 * one < scanned < 3 * one  # the stem and head are not repeated


def _step_and_args(config, mesh):
    step, args = aot.abstract_step_args(config, mesh, (8, 8, 3), 10)
    return (step, *args)


def test_bfloat16_halves_activation_memory_and_runs_bf16_convolutions(tpu):
    def compiled(dtype):
        return aot.compile_train_step(_resnet("width=32,depth=4", 64, dtype=dtype), tpu, *CIFAR)

    f32, bf16 = compiled("float32"), compiled("bfloat16")
    assert bf16.temp_bytes < 0.65 * f32.temp_bytes
    convs = re.findall(r"= (\w+)\[[^\]]*\][^ ]* convolution\(", bf16.compiled.as_text())
    assert convs and set(convs) == {"bf16"}
    assert bf16.argument_bytes == f32.argument_bytes  # float32 parameters and optimizer state
