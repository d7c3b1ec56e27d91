"""One mesh with axes ('data', 'fsdp'); shardings for the batch and for the training state.

The batch is split over both axes. Each parameter (and its EMA copy and Adam moments) is split
over 'fsdp' on its largest divisible dimension, replicated where nothing divides. Axes are Auto:
cuDNN attention's partitioning rules are written for them.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")
# Seconds the processes of a run wait for one that stopped answering before they all stop.
DISTRIBUTED_TIMEOUT_S = 60
T = TypeVar("T")


def is_multiprocess_env(env=os.environ) -> bool:
    """True when the launcher says this is one process of several (SLURM, Open MPI, explicit)."""
    return (
        "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = DISTRIBUTED_TIMEOUT_S,
) -> None:
    """Join a multi-process run when asked to or when the environment describes one.

    jax.distributed reads SLURM / Open MPI variables itself; explicit values win over them.
    Must run before anything touches the devices. `timeout_s` bounds how long the others wait
    for a process that stopped answering (killed, crashed, host lost) before they all stop, and
    how long a finished process waits for the others at exit.
    """
    explicit = coordinator or num_processes is not None or process_id is not None
    if not (explicit or is_multiprocess_env()):
        return
    if explicit and not is_multiprocess_env() and None in (coordinator, num_processes, process_id):
        raise ValueError(
            "a multi-process run outside SLURM / Open MPI needs all three of "
            "--coordinator_address=HOST:PORT (process 0's host, a free port), --num_processes "
            "and --process_id (0 .. num_processes-1, one per process)"
        )
    # A CPU mesh that spans processes needs cross-process collectives (gloo over TCP); they are
    # chosen when the CPU backend starts, i.e. now, before anything touches the devices.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # jax binds the coordinator to every interface by default; a one-machine run keeps it local.
    bind = coordinator if coordinator and _is_loopback(coordinator) else None
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        coordinator_bind_address=bind,
        heartbeat_timeout_seconds=timeout_s,
        shutdown_timeout_seconds=timeout_s,
    )
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # Measured with jax 0.10.2: a CPU executable read back from the persistent compilation
        # cache pairs its cross-process collectives wrongly (with a freshly compiled peer: a
        # hang; with a cached peer: gloo "Received data size doesn't match"). Compile afresh.
        jax.config.update("jax_enable_compilation_cache", False)


def exit_at_once_on_error(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs); in a multi-process run an exception ends this process at once, with
    its traceback and one last line saying what happened (a user error's exit, at once too).

    Left alone, it would wait at exit for the other processes (jax's shutdown barrier) while they
    wait in a collective for it, or for a process that is gone: the run would hang until the
    distributed timeout and end in a page of C++ logs. Exiting at once makes the others fail
    fast too (their collectives lose this peer).
    """
    if jax.process_count() == 1:
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except SystemExit as e:  # a user error, already printed in one line
        if e.code in (0, None):
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
    except (Exception, KeyboardInterrupt) as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        if not interrupted:
            traceback.print_exc()
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        if interrupted:
            what = "was interrupted (SIGINT; SIGTERM would save a checkpoint first)"
        else:
            what = (
                f"stopped on {type(e).__name__}: {detail}. If another process of this run "
                "failed or was killed first (its log says why), this is the consequence"
            )
        print(
            f"error: process {jax.process_index()} of {jax.process_count()} {what}. Every "
            "process stops now; rerun the same command on all of them to resume from the last "
            "checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(130 if interrupted else 1)  # skip the shutdown barrier: the others may be gone


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


def traced_on(mesh: Mesh, fn: Callable[..., T]) -> Callable[..., T]:
    """fn, traced with `mesh` in context: the mesh `split_batch` and `gathered` inside it lay
    their arrays out over."""

    @functools.wraps(fn)
    def on_mesh(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return on_mesh


def batch_shards() -> int:
    """How many devices the batch is split over on the mesh traced on (`traced_on`); 1 where
    no such mesh is set, or inside a `shard_map` over its batch axes (each device's rows)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.auto_axes):
        return 1
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def split_batch(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The arrays with their leading (batch) dimension split over the batch axes of the mesh
    they are traced on (`traced_on`); as they are where no such mesh is set, or it has one
    device (so a one-device step compiles exactly as without it)."""
    if batch_shards() == 1:
        return arrays
    return tuple(jax.lax.with_sharding_constraint(a, PartitionSpec(BATCH_AXES)) for a in arrays)


def local_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The block of a batch-leading array of `shape` that `on_each_device` hands each device;
    None where its rows do not split evenly (it then runs the function on the whole array)."""
    shards = batch_shards()
    if shape[0] % shards:
        return None
    return (shape[0] // shards, *shape[1:])


def on_each_device(fn: Callable[..., T], *args: jax.Array, whole: tuple[int, ...] = ()) -> T:
    """fn(*args) run by each device on its own rows of the batch: every argument split over the
    batch axes on its leading dimension, except those at the positions in `whole`, which each
    device gets entire (a layer's weights); every output split the same way.

    For custom kernels (Pallas calls): XLA's partitioner cannot split one, so in a sharded step
    it would gather the kernel's inputs whole on every device and run the whole batch on each.
    As it is where the batch is not split (one device, no mesh) or its rows do not divide.
    """
    if batch_shards() == 1 or any(
        local_shape(np.shape(a)) is None for i, a in enumerate(args) if i not in whole
    ):
        return fn(*args)
    rows = PartitionSpec(BATCH_AXES)
    specs = tuple(PartitionSpec() if i in whole else rows for i in range(len(args)))
    # Outputs are split as the rows they come from: nothing for the checker to prove.
    each = jax.shard_map(fn, in_specs=specs, out_specs=rows, check_vma=False)
    return each(*args)


def gathered(tree):
    """Every array of `tree` whole on each device of the mesh it is traced on (`traced_on`):
    FSDP's gather of a layer's parameters just before the layer runs, its gradient split back
    over 'fsdp' (a reduce-scatter); as it is where the mesh has no 'fsdp' split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("fsdp", 1) == 1:
        return tree
    return jax.tree.map(_gather, tree)


@jax.custom_vjp
def _gather(a: jax.Array) -> jax.Array:
    return jax.lax.with_sharding_constraint(a, PartitionSpec())


def _gather_backward(_, grad):
    # The gradient's own transpose would keep it whole on every device: an all-reduce, twice
    # the bytes of a reduce-scatter, and a whole gradient per device in memory.
    fsdp = jax.sharding.get_abstract_mesh().shape["fsdp"]
    return (jax.lax.with_sharding_constraint(grad, _fsdp_spec(grad.shape, fsdp)),)


_gather.defvjp(lambda a: (_gather(a), None), _gather_backward)


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
    """Assemble each process's rows of the batch into global arrays sharded over the mesh.

    Process p holds rows p*L .. p*L + L - 1 of the global batch (data.process_rows); the arrays
    put them exactly there, or this raises if the mesh gives p's devices other rows.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        global_shape = (len(v) * jax.process_count(), *np.shape(v)[1:])
        _check_process_rows(sharding, global_shape[0])
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


def device_batches(
    mesh: Mesh, host_batches: Iterable[dict[str, np.ndarray]], ahead: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """`global_batch` of each host batch in order, each put on the devices `ahead - 1` batches
    before it is yielded, so its transfer has a whole step to finish in.

    Put just before its step, a batch cost that step about 0.3 ms at B/16 in a feeding probe;
    in whole benched steps putting them ahead measured level (BENCHMARKS.md, the twelfth and
    thirteenth sessions), but a loader slower than the bench's keeps a whole step to hide in.
    """
    queue = collections.deque()
    for host in host_batches:
        queue.append(global_batch(mesh, host))
        if len(queue) >= ahead:
            yield queue.popleft()
    yield from queue


@functools.lru_cache(maxsize=16)
def _check_process_rows(sharding: NamedSharding, batch: int) -> None:
    """Raise unless this process's devices hold exactly rows p*L .. p*L + L - 1 of `batch`.

    make_array_from_process_local_data fills the rows a process's devices hold with its local
    rows in order; if those were other rows, the global batch would silently be reordered.
    """
    index_map = sharding.addressable_devices_indices_map((batch,))
    held = sorted({r for (rows,) in index_map.values() for r in range(*rows.indices(batch))})
    p, local = jax.process_index(), batch // jax.process_count()
    if held != list(range(p * local, (p + 1) * local)):
        raise ValueError(
            f"the mesh gives process {p}'s devices batch rows {held[:4]}... but the input "
            f"pipeline reads rows {p * local}..{(p + 1) * local - 1}: the mesh's device order "
            "must put each process's devices together (jax.devices() order)"
        )
