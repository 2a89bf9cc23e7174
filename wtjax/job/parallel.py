"""Devices, mesh and shardings: the only module of the training job that knows about devices.

Data parallelism over a 1-D mesh with axis ``'data'``: parameters and optimizer state are
replicated on every device, each batch is split along its leading axis. The same code runs on one
CPU, on fake CPU devices, on a TPU host and on several processes (multi-host): every process feeds
its own slice of the global batch and :func:`global_batch` assembles the global array.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(dist_config) -> None:
    """Start ``jax.distributed`` when the config (or ``auto``) asks for several processes.

    Must run before any JAX computation. ``num_processes`` > 1 with an explicit coordinator address
    and process id starts a local/manual cluster; ``auto=True`` lets JAX detect the cluster (TPU
    pods, SLURM, ...). On CPU the cross-process collectives use ``cpu_collectives`` (gloo).
    Does nothing for single-process runs or when already initialised.
    """
    num = dist_config.num_processes
    if not dist_config.auto and (num is None or num <= 1):
        return
    if jax.distributed.is_initialized():
        return
    if dist_config.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", dist_config.cpu_collectives)
    if dist_config.auto:
        jax.distributed.initialize()
        return
    if dist_config.coordinator_address is None or dist_config.process_id is None:
        raise ValueError(
            "distributed.num_processes > 1 needs distributed.coordinator_address (host:port) and "
            "distributed.process_id (or set distributed.auto=True on a managed cluster)"
        )
    jax.distributed.initialize(
        coordinator_address=dist_config.coordinator_address,
        num_processes=num,
        process_id=dist_config.process_id,
    )


def use_cpu_cores(batch_sizes: Sequence[int] = ()) -> int | None:
    """One CPU device per core this process may use, unless a count was chosen; call before JAX runs.

    XLA:CPU runs much of a training step on one core; data parallelism over one CPU device per
    core uses them all (results equal one device's up to the order of float reductions). Only the
    CPU backend's device count changes, so this is harmless on GPU/TPU hosts, where the mesh is
    built over the accelerators.

    Args:
      batch_sizes: sizes every device must get an equal share of (the job's per-micro-batch and
        eval batch sizes): the count is the largest one up to the number of cores dividing them all.

    Returns:
      The device count set, or ``None`` when left alone: ``JAX_NUM_CPU_DEVICES`` (or
      ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``) or ``jax_num_cpu_devices`` was
      set by the user, or a JAX computation already ran (the backends are fixed by then).
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    if jax.config.values["jax_num_cpu_devices"] != -1:  # JAX_NUM_CPU_DEVICES or jax.config.update
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    count = max(d for d in range(1, cores + 1) if all(n % d == 0 for n in batch_sizes))
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # "should be updated before backends are initialized"
        return None
    return count


def create_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``'data'`` mesh over all devices, or over the first ``num_devices`` (one process only).

    Raises:
      ValueError: ``num_devices`` exceeds the available devices, or is set in a multi-process run
        (where every process must contribute all its devices).
    """
    devices = jax.devices()
    if num_devices is not None:
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError("num_devices can only restrict the devices of a single-process run")
        if not 0 < num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} device(s) are available")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: split along the leading (example) axis over ``'data'``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def jit_train_step(train_step, mesh: Mesh, num_frozen: int = 0):
    """``train_step(state, batch, *frozen)`` jitted for data parallelism over ``mesh``.

    The state and the ``num_frozen`` extra arguments are replicated, the batch is split over
    ``'data'``; the old state's buffers are donated to the new state. The training job and the
    ahead-of-time compiler (:mod:`wtjax.tools.aot`) compile this same program.
    """
    rep = replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(rep, batch_sharded(mesh)) + (rep,) * num_frozen,
        out_shardings=(rep, rep),
        donate_argnums=0,
    )


def check_batch_size(global_batch: int, mesh: Mesh, grad_accum_steps: int = 1) -> int:
    """This process's share of ``global_batch``; it must divide evenly over devices and processes.

    With gradient accumulation every micro-batch is split over all devices, so ``global_batch``
    must be divisible by ``grad_accum_steps * mesh.size``.
    """
    if global_batch % (grad_accum_steps * mesh.size):
        accum = f"grad_accum_steps {grad_accum_steps} x " if grad_accum_steps > 1 else ""
        raise ValueError(
            f"batch size {global_batch} is not divisible by {accum}the {mesh.size} devices of the mesh"
        )
    return global_batch // jax.process_count()


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assemble each process's slice (numpy arrays) into global arrays split over ``'data'``."""
    sharding = batch_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()
    }


def process_info() -> tuple[int, int]:
    """``(process_index, process_count)``."""
    return jax.process_index(), jax.process_count()


def is_main_process() -> bool:
    """True on process 0, which writes logs, metrics files and the config."""
    return jax.process_index() == 0


def env_summary(mesh: Mesh) -> str:
    """A one-line description of the devices in use, for the log."""
    kinds = sorted({d.device_kind for d in mesh.devices.flat})
    return (
        f"{mesh.size} device(s) {kinds} on {jax.process_count()} process(es) "
        f"(this is process {jax.process_index()}, pid {os.getpid()})"
    )
