"""`compiled` mode: the real training step compiled for a GPU model that need not be here (jax's
CUDA plugin compiles ahead of time from a description of the card), its kernels counted by
group, with the bytes each group moves and the least time that takes at the card's bandwidth.

It answers, before any GPU time is spent, whether a change fuses as meant (a GELU in a GEMM's
epilogue, an FP8 GEMM writing e4m3) and how many bytes the memory-bound kernels move. For a mesh
of several GPUs and hosts (`--gpus`, `--hosts`) it also answers whether the sharded step
compiles, fits, and what each GPU sends to the others. It cannot time GEMMs, attention or
collectives, or pick GEMM algorithms (autotuning runs kernels; nothing runs here). It needs
jax's CUDA plugin (`pip install "jax[cuda13]"`), not a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from unittest import mock

from jepa_jax.bench import hlo
from jepa_jax.bench.common import _environment, _memory, step_config

# name: (what CUDA calls the device, memory bytes, memory bandwidth bytes/s). Both are Hopper
# SXM parts (compute capability 9.0, 132 SMs at up to 1.98 GHz, 50 MiB of L2); they differ in
# memory. Both send 450 GB/s each way over NVLink 4 (18 links of 25 GB/s) to GPUs of their host.
GPUS = {
    "h100": ("NVIDIA H100 80GB HBM3", 84_978_434_048, 3.35e12),
    "h200": ("NVIDIA H200", 150_754_820_096, 4.8e12),
}
NVLINK_BANDWIDTH = 450e9
# What XLA's GPU compiler asks of a card (stream_executor.GpuTargetConfigProto, text format).
# The CUDA runtime and cuDNN versions gate rewrites (FP8 GEMMs need CUDA 12 or later).
_TARGET_CONFIG = """
gpu_device_info {{
  device_memory_size: {memory} memory_bandwidth: {bandwidth:.0f}
  cuda_compute_capability {{ major: 9 minor: 0 }} core_count: 132 fpus_per_core: 128
  clock_rate_ghz: 1.98 l2_cache_size: 52428800
  threads_per_block_limit: 1024 threads_per_warp: 32 threads_per_core_limit: 2048
  shared_memory_per_block: 49152 shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472 registers_per_core_limit: 65536 registers_per_block_limit: 65536
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
}}
platform_name: "CUDA"
device_description_str: "{name}"
runtime_version {{ major: 13 minor: 0 }}
dnn_version_info {{ major: 9 minor: 19 }}
"""


def compile_only_devices(gpu: str, hosts: int = 1, per_host: int = 1) -> list:
    """Compile-only devices of `gpu` (a key of GPUS): `hosts` processes of `per_host` each."""
    from jax.experimental import topologies

    name, memory, bandwidth = GPUS[gpu]
    config = _TARGET_CONFIG.format(name=name, memory=memory, bandwidth=bandwidth)
    try:
        # "slices x hosts x GPUs per host": one slice, the hosts of one run.
        shape = f"1x{hosts}x{per_host}"
        topology = topologies.get_topology_desc(gpu, "cuda", topology=shape, target_config=config)
    except NotImplementedError:  # jax without a CUDA backend knows no "cuda" topology
        raise RuntimeError(
            "bench compiled compiles for a GPU with jax's CUDA plugin, which is not installed; "
            'install it with pip install -e ".[cuda]" (no GPU needed)'
        ) from None
    return list(topology.devices)


@contextlib.contextmanager
def compiling_for(devices: list):
    """While the step is built and compiled: `jax.devices()` answers `devices`, so attention
    and the kernels resolve as on that card; their startup checks (which run a kernel) count as
    passed; and Pallas's Triton lowering is told the card (jax 0.11 asks the attached device;
    jax 0.10 lowers for compute capability 9.0 without one, which both GPUS are)."""
    import jax

    from jepa_jax import attention, kernels

    patches = [
        (jax, "devices", lambda backend=None: list(devices)),
        (attention, "_cudnn_probe", lambda: None),
        (kernels, "_startup_check", lambda *args, **kwargs: None),
    ]
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError:
        pass
    else:
        card = gpu_info.get_gpu_info_from_version(
            gpu_info.gpu_version_from_device_kind(devices[0].device_kind)
        )
        patches.append((gpu_info, "get_gpu_info", lambda: card))
    with contextlib.ExitStack() as stack:
        for owner, name, value in patches:
            stack.enter_context(mock.patch.object(owner, name, value))
        yield


def compile_step(args, impl: str, devices: list):
    """The real step for --config and its overrides with `impl` attention, compiled for
    `devices` from abstract state and batch (nothing is allocated); (compiled, seconds)."""
    import jax
    import numpy as np

    from jepa_jax import data, masks, optim, sharding, trainer

    config = step_config(args, impl, len(devices))
    with compiling_for(devices):
        mesh = sharding.make_mesh(config.mesh, devices)
        net, state = trainer.abstract_state(config, mesh)
        tx = optim.optimizer(config, state.params)
        spec, side = masks.mask_spec(config), config.model.image_size
        images = np.zeros((config.batch_size, side, side, 3), np.uint8)
        rows = sharding.batch_sharding(mesh)
        batch = {
            key: jax.ShapeDtypeStruct(np.shape(value), np.asarray(value).dtype, sharding=rows)
            for key, value in data.synthetic_batch(config, spec, images, 0).items()
        }
        start = time.perf_counter()
        lowered = trainer.compile_step(config, net, tx, mesh, state).lower(state, batch)
        compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def group_rows(
    found: list[dict], bandwidth: float, link_bandwidth: float = NVLINK_BANDWIDTH
) -> list[dict]:
    """hlo.kernels' kernels by group, most bytes first: launches, GB and the least ms those
    bytes take at `bandwidth` (a collective's: at `link_bandwidth`, what a device sends over
    its links); what a group's fusions compute where they all compute one thing, and the
    element types a group of collectives carries."""
    launches, moved = collections.Counter(), collections.Counter()
    kind, what = {}, collections.defaultdict(set)
    for kernel in found:
        group = kernel["group"]
        launches[group] += 1
        moved[group] += kernel["bytes"]
        kind[group] = kernel["kind"]
        what[group].add(kernel["what"])
    speed = {group: link_bandwidth if k == "collective" else bandwidth for group, k in kind.items()}
    return [
        {
            "group": group,
            "kind": kind[group],
            "kernels": launches[group],
            "gb": moved[group] / 1e9,
            "least_ms": moved[group] / speed[group] * 1e3,
            "what": _what(kind[group], what[group]),
        }
        for group, _ in moved.most_common()
    ]


def _what(kind: str, whats: set) -> str | None:
    if kind == "collective":  # every element type any of them carries
        return ", ".join(sorted({dtype for what in whats for dtype in what.split(", ")}))
    return next(iter(whats)) if len(whats) == 1 else None


SUMMED = ("kernels", "gb", "least_ms")  # a row's fields that add up over a kind


def run_compiled(args) -> dict:
    devices = compile_only_devices(args.gpu, args.hosts, args.gpus)
    bandwidth = GPUS[args.gpu][2]
    where = f"{len(devices)} x {args.gpu}" + (f" on {args.hosts} hosts" if args.hosts > 1 else "")
    rows, summaries = [], []
    for impl in args.impls.split(","):
        compiled, seconds = compile_step(args, impl, devices)
        text = compiled.as_text()
        if args.hlo_dir:  # for reading further than the table goes
            os.makedirs(args.hlo_dir, exist_ok=True)
            with open(os.path.join(args.hlo_dir, f"{impl}.hlo"), "w") as f:
                f.write(text)
        groups = group_rows(hlo.kernels(text), bandwidth)
        by_kind = {}
        for row in groups:
            totals = by_kind.setdefault(row["kind"], dict.fromkeys(SUMMED, 0))
            for key in totals:
                totals[key] += row[key]
        memory = _memory(compiled)
        summaries.append(
            {"impl": impl, "gpu": args.gpu, "devices": len(devices), "compile_s": seconds}
            | {"by_kind": by_kind}
            | memory
        )
        rows += [{"impl": impl, **row} for row in groups[: args.top]]
        kinds = ", ".join(f"{k} {v['kernels']} ({v['gb']:.1f} GB)" for k, v in by_kind.items())
        least = by_kind.get("fusion", {}).get("least_ms", 0.0)
        links = by_kind.get("collective")
        sent = links and (
            f"; each GPU sends {links['gb']:.2f} GB to the others, at least "
            f"{links['least_ms']:.1f} ms at {NVLINK_BANDWIDTH / 1e9:.0f} GB/s"
        )
        print(
            f"{impl} on {where}: compiled in {seconds:.1f} s; XLA's memory estimate "
            f"{memory.get('total_bytes', 0) / 2**30:.2f} GiB per GPU; kernels per step: {kinds}; "
            f"the fusions' bytes take at least {least:.1f} ms at {bandwidth / 1e12:.2f} TB/s"
            f"{sent or ''}",
            flush=True,
        )
    return {"env": _environment(), "summaries": summaries, "rows": rows, "ratios": {}}


COMPILED_COLUMNS = (
    ("impl", lambda r: r["impl"], ""),
    ("kernel group", lambda r: r["group"], ""),
    ("kind", lambda r: r["kind"], ""),
    ("kernels", lambda r: r["kernels"], "d"),
    ("GB", lambda r: r["gb"], ".2f"),
    ("least ms", lambda r: r["least_ms"], ".2f"),
    ("what", lambda r: (r.get("what") or "")[:90], ""),
)
