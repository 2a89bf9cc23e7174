"""The training step compiles for real accelerator targets, without the accelerators.

Deviceless ahead-of-time compilation (:mod:`wtjax.aot`) for a TPU v5e slice (libtpu) and 8 H100s
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
from wtjax import aot, parallel

H100 = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "targets" / "h100_sxm.pbtxt"
CIFAR = ((32, 32, 3), 10)


def _require(module: str):
    if importlib.util.find_spec(module) is None:
        if os.environ.get("WTJAX_REQUIRE_AOT") == "1":
            pytest.fail(f"{module} is not installed but WTJAX_REQUIRE_AOT=1: pip install -e '.[aot]'")
        pytest.skip(f"{module} not installed (pip install -e '.[aot]')")


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


def test_auto_convolutions_follow_the_target_not_the_host(gpu):
    """On a CPU host, 'auto' compiles to cuDNN's own backward convolutions for a GPU target."""

    def conv_calls(impl):
        report = aot.compile_train_step(_resnet(batch=16, conv_impl=impl), gpu, *CIFAR)
        assert report.host_callbacks == [] and report.platform == "gpu"
        return set(re.findall(r'custom_call_target="(__cudnn\$conv\w*)"', report.compiled.as_text()))

    auto, im2col = conv_calls("auto"), conv_calls("im2col")
    assert "__cudnn$convBackwardFilter" in auto and "__cudnn$convBackwardInput" in auto
    assert not any("Backward" in c for c in im2col)  # the CPU workaround's gradients are forward convs


def test_sqrt_checkpointing_keeps_memory_flat_in_depth(tpu):
    def temp(depth, **model):
        return aot.compile_train_step(_resnet(f"width=16,depth={depth}", 64, **model), tpu, *CIFAR).temp_bytes

    sqrt4, sqrt32 = temp(4, checkpoint_every="sqrt"), temp(32, checkpoint_every="sqrt")
    store32 = temp(32)
    assert sqrt32 <= 3 * sqrt4
    assert store32 > 4 * sqrt32


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
