"""One mesh with axes ('data', 'fsdp'); shardings for the batch and for the training state.

The batch is split over both axes. Each parameter (and its EMA copy and Adam moments) is split
over 'fsdp' on its largest divisible dimension, replicated where nothing divides. Axes are Auto:
cuDNN attention's partitioning rules are written for them.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


def is_multiprocess_env(env=os.environ) -> bool:
    """True when the launcher says this is one process of several (SLURM, Open MPI, explicit)."""
    return (
        "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )


def initialize_distributed(coordinator: str | None = None, num_processes=None, process_id=None):
    """Join a multi-process run when asked to or when the environment describes one.

    jax.distributed reads SLURM / Open MPI variables itself; explicit values win over them.
    Must run before anything touches the devices.
    """
    if coordinator or is_multiprocess_env():
        jax.distributed.initialize(coordinator, num_processes, process_id)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """Mesh of shape (data, fsdp) over all devices; -1 in one axis takes what is left."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
    if fsdp == -1 and data == -1:
        raise ValueError("config.mesh.data and config.mesh.fsdp are both -1; set at most one to -1")
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ValueError(
            f"config.mesh.data={mesh_config.data} x config.mesh.fsdp={mesh_config.fsdp} does not "
            f"fit {n} devices; their product must equal the device count (use -1 for one axis)"
        )
    return jax.make_mesh(
        (data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2, devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """Split the largest dimension that `fsdp` divides; replicate if none does."""
    if fsdp > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp == 0:
                return PartitionSpec(*[("fsdp" if d == dim else None) for d in range(len(shape))])
    return PartitionSpec()


def state_shardings(mesh: Mesh, abstract_state):
    """NamedSharding for every leaf of a (possibly abstract) pytree of arrays."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, _fsdp_spec(np.shape(x), fsdp)), abstract_state
    )


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assemble each host's slice of the batch into global arrays sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
