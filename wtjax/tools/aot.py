"""Compile the training step for TPUs and GPUs that are not attached (deviceless ahead of time).

XLA compiles for a device *description*: ``jax.experimental.topologies.get_topology_desc`` gives
abstract devices of a TPU slice (with ``libtpu`` installed, e.g. ``jax[tpu]``) or of GPUs
described by an XLA ``GpuTargetConfig`` (with the ``jax-cuda12-plugin``/``-pjrt`` wheels of the
installed jax, under ``JAX_PLATFORMS=cpu``). A data-parallel mesh over those devices, the job's
own jitted step (:func:`wtjax.job.parallel.jit_train_step`) and sharded ``jax.ShapeDtypeStruct``
arguments give the exact program a real run would execute, so on a CPU-only machine we get:

* whether it compiles at all (the TPU compiler refuses programs larger than HBM with
  ``RESOURCE_EXHAUSTED``; the GPU compiler does not, compare :attr:`AotReport.peak_bytes` with the
  device memory yourself);
* the per-device memory (``memory_analysis()``) and XLA's cost analysis (TPU only; GPU gives
  none). XLA counts a while loop's body **once**, so its FLOPs and bytes undercount a scanned tie;
  :func:`jaxpr_flops` counts the matmul/conv FLOPs of the step with every ``scan`` multiplied by its
  length (``while`` loops, e.g. DEQ solvers with data-dependent stopping, still count once);
* host callbacks that would stall an accelerator step (:func:`host_callbacks`).

Nothing here runs a program: no timing can come from this module.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core
from jax.sharding import Mesh

from wtjax.job import config as config_schema
from wtjax.job import optim, parallel, steps

# A multiply-add is 2 FLOPs; only dot products and convolutions are counted (they dominate).
from wtjax.methods import lora_finetune

_DOT, _CONV = "dot_general", "conv_general_dilated"


def tpu_devices(topology: str = "v5e:2x4", chips_per_host_bounds: Sequence[int] | None = (2, 4, 1)):
    """Abstract devices of a TPU slice, e.g. ``'v5e:2x4'`` (8 chips, one host).

    ``chips_per_host_bounds`` splits the slice over hosts: ``'v5e:4x4'`` with ``(2, 4, 1)`` is two
    hosts of 8 chips (each device's ``process_index`` tells its host). Needs ``libtpu``.
    """
    # libtpu takes a process-wide lock file (parallel test workers each load it) and writes logs to
    # the system temp folder unless told otherwise.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_LOG_DIR", os.path.join(tempfile.gettempdir(), "wtjax_tpu_logs"))
    from jax.experimental import topologies

    kwargs = {} if chips_per_host_bounds is None else {"chips_per_host_bounds": tuple(chips_per_host_bounds)}
    return topologies.get_topology_desc(topology, platform="tpu", **kwargs).devices


def gpu_devices(target_config: str | os.PathLike, topology: str = "1x1x8"):
    """Abstract GPUs described by an XLA ``GpuTargetConfig`` text proto (``topology`` =
    ``'slices x hosts x devices'``). Needs the ``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` wheels
    of the installed jax and ``JAX_PLATFORMS=cpu`` on a machine without GPUs."""
    from jax.experimental import topologies

    text = open(target_config).read()
    return topologies.get_topology_desc(platform="cuda", topology=topology, target_config=text).devices


@dataclasses.dataclass
class AotReport:
    """What deviceless compilation tells about one training step (per device unless noted)."""

    platform: str
    device_kind: str
    num_devices: int
    num_processes: int
    global_batch: int
    compile_s: float
    peak_bytes: int  # XLA's peak of live buffers (arguments, outputs, temporaries)
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    model_flops: float  # matmul/conv FLOPs per device with scans counted K times (jaxpr_flops)
    xla_flops: float | None  # XLA's cost analysis (loop bodies once); None where XLA gives none
    xla_bytes: float | None
    host_callbacks: list[str]
    compiled: object = dataclasses.field(repr=False, compare=False, default=None)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "compiled"}


def _for_platform(model, mesh: Mesh):
    """``model`` with the tie's default unroll of the platform compiled for, not of this host.

    A family's ``unroll=None`` resolves through :func:`wtjax.core.tied.default_unroll` on the
    backend it is traced on; on a CPU host compiling for an accelerator that would be the CPU's
    (unrolled) choice. Accelerators take the scan (``1``).
    """
    if getattr(model, "unroll", 1) is None and mesh.devices.flat[0].platform != "cpu":
        return model.clone(unroll=1)
    return model


def abstract_step_args(config, mesh: Mesh, image_shape: Sequence[int], num_classes: int):
    """``(train_step, args)``: the job's step for ``config`` and its abstract arguments on ``mesh``.

    ``args`` is ``(state, batch)``, plus the frozen pretrained parameters for a LoRA fine-tuning
    config (``config.lora``; their shapes come from the model, no checkpoint is read). The optimizer
    schedule is built for a nominal 10^6-step run (its length does not change the program).
    Arrays are ``jax.ShapeDtypeStruct`` with the job's shardings.
    """
    model = _for_platform(config_schema.model_from_config(config.model, num_classes), mesh)
    tx, schedule = optim.create_optimizer(config.optim, total_steps=10**6, steps_per_epoch=100)
    key = jax.random.PRNGKey(config.seed)
    image_shape = tuple(image_shape)
    finetune = lora_finetune.from_config(config.lora) if config.get("lora") is not None else None

    def init_all():
        if finetune is None:
            return steps.make_init_state(model, tx, image_shape, key)(), ()
        images = jnp.zeros((1, *image_shape), jnp.float32)
        base = model.init({"params": key, "dropout": key}, images, train=False)["params"]
        trainable = finetune.init(key, base)
        return steps.make_init_state(model, tx, image_shape, key)(trainable), (base,)

    hooks = (
        () if finetune is None else (lora_finetune.FinetuneHook(finetune),)
    )  # the frozen base: an argument
    accum = {"grad_accum_steps": config.grad_accum_steps, "batch_shards": mesh.size}
    step = steps.make_train_step(
        model, tx, schedule, key, hooks, **accum, solver_failure=config.solver_failure
    )
    rep, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    state, frozen = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), jax.eval_shape(init_all)
    )
    batch = {
        "image": jax.ShapeDtypeStruct((config.batch_size, *image_shape), jnp.float32, sharding=split),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=split),
    }
    return step, (state, batch, *frozen)


def compile_train_step(config, devices, image_shape: Sequence[int], num_classes: int) -> AotReport:
    """Compile ``config``'s data-parallel training step for ``devices`` (e.g. :func:`tpu_devices`).

    Raises whatever the compiler raises (e.g. ``XlaRuntimeError: RESOURCE_EXHAUSTED`` when the
    program does not fit a TPU's HBM).
    """
    mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
    step, args = abstract_step_args(config, mesh, image_shape, num_classes)
    jitted = parallel.jit_train_step(step, mesh, num_frozen=len(args) - 2)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return AotReport(
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        num_devices=len(devices),
        num_processes=len({d.process_index for d in devices}),
        global_batch=config.batch_size,
        compile_s=compile_s,
        peak_bytes=int(getattr(memory, "peak_memory_in_bytes", 0) or _live_bytes(memory)),
        temp_bytes=int(memory.temp_size_in_bytes),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        model_flops=jaxpr_flops(step, *args) / len(devices),
        xla_flops=cost.get("flops"),
        xla_bytes=cost.get("bytes accessed"),
        host_callbacks=host_callbacks(compiled.as_text()),
        compiled=compiled,
    )


def _live_bytes(memory) -> int:
    """Arguments + outputs + temporaries, less the outputs aliased to (donated) arguments."""
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )


def jaxpr_flops(fn, *args) -> float:
    """Matmul and convolution FLOPs of ``fn(*args)`` (global shapes), scans counted ``length`` times.

    Sub-jaxprs (``pjit``, ``remat``, custom derivatives) are entered; of a ``cond`` (e.g.
    ``lax.platform_dependent``) the costliest branch counts; a ``while`` body counts once.
    Rematerialised forward passes appear in the backward pass and are counted: compare a step
    with and without remat for the recompute cost.
    """
    return _eqns_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _eqns_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == _DOT:
            total += _dot_flops(eqn)
        elif name == _CONV:
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max(_eqns_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            inner = sum(_eqns_flops(j) for j in _sub_jaxprs(eqn.params))
            total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def _sub_jaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax_core.Jaxpr):
                yield v


def _dot_flops(eqn) -> float:
    (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    out = eqn.outvars[0].aval.shape
    contracted = math.prod(lhs[d] for d in lhs_contract)
    del lhs_batch, rhs  # the output already spans the batch and free dimensions
    return 2.0 * math.prod(out) * contracted


def _conv_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    out = eqn.outvars[0].aval.shape
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial) axes
    per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
    del lhs
    return 2.0 * math.prod(out) * per_output


_CALLBACK = re.compile(r'custom_call_target="([^"]*callback[^"]*)"|\b(send|recv|outfeed|infeed)\(')


def host_callbacks(hlo_text: str) -> list[str]:
    """Host round trips in a compiled program: Python callbacks, send/recv, in/outfeed."""
    return sorted({a or b for a, b in _CALLBACK.findall(hlo_text)})
