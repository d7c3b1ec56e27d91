"""`profile` mode: a `jax.profiler` trace of the real training step, its GPU kernels grouped.

Kernels are grouped by name with digits masked, so one group is one fusion kind or one GEMM
kernel family summed over all layers, and classed as gemm, attention, copy or fusion. The trace
itself stays under --trace-dir for Perfetto or TensorBoard. While profiling, XLA runs the step
op by op instead of as CUDA graphs, so kernels carry their fusions' names; a B/16 step runs as
fast without graphs (BENCHMARKS.md, thirteenth session), so the trace times the real step.
On a CPU the trace holds host events only, and the kernel table is empty.

Each fusion group also gets the bytes its kernels must move (`hlo.fusion_bytes`: every operand
read once, or only the slices taken of it, every result written once) over their time: achieved
GB/s, to set beside the card's copy bandwidth. XLA names a fusion's kernel after the fusion and runs
identical fusions through one kernel, so a kernel name stands for one fusion's shapes. One
group can hold fusions that compute different things (`loop_convert_fusion_#`: GELUs,
normalisations, casts), so `--by kernel` lists each kernel name alone instead, with what its
fusion computes: the ops inside and the result's shape.

The summary also gives the time, within the traced steps, when no GPU stream ran a kernel
(launch gaps and waits on the host), and which kernels those gaps came before.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time

from jepa_jax.bench.common import _environment, real_step_inputs
from jepa_jax.bench.hlo import fusion_bytes, fusion_contents

# First match wins, so cuDNN's helper kernels (cudnn::fusion::...) count as attention. Of this
# package's kernels, short_attention_backward is attention and the q/k/v kernel (the one Mosaic
# GPU kernel) a GEMM.
KINDS = (
    ("attention", ("sdpa", "fmha", "flash", "cudnn", "attention")),
    ("gemm", ("nvjet", "gemm", "xmma", "cutlass", "splitkreduce", "mosaic")),
    ("copy", ("memcpy", "memset")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lowered for k in keys)), "fusion")


def kernel_group(name: str) -> str:
    """'loop_convert_fusion_17' and 'loop_convert_fusion_3' -> 'loop_convert_fusion_#'."""
    return re.sub(r"\d+", "#", name)[:100]


def kernel_alone(name: str) -> str:
    """`--by kernel`: every kernel name its own group."""
    return name[:100]


def _stream_events(trace) -> list[dict]:
    """The complete events on GPU streams of a Perfetto JSON trace: its kernels."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    meta = [e for e in events if e.get("ph") == "M"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    threads = {
        (e["pid"], e.get("tid")): e["args"]["name"] for e in meta if e.get("name") == "thread_name"
    }
    streams = {
        key
        for key, name in threads.items()
        if "GPU" in processes.get(key[0], "") and "Stream" in name
    }
    return [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams]


def device_kernels(trace) -> list[tuple[str, float]]:
    """(name, microseconds) of every kernel on a GPU stream in a Perfetto JSON trace."""
    return [(e["name"], float(e["dur"])) for e in _stream_events(trace)]


def idle_gaps(trace) -> list[tuple[float, str]]:
    """(microseconds, the kernel that ends it) for each stretch between the first kernel's
    start and the last one's end in which no GPU stream ran a kernel: launch gaps inside and
    between steps, and waits on the host."""
    events = sorted(_stream_events(trace), key=lambda e: float(e["ts"]))
    gaps, busy_until = [], float(events[0]["ts"]) if events else 0.0
    for e in events:
        start = float(e["ts"])
        if start > busy_until:
            gaps.append((start - busy_until, e["name"]))
        busy_until = max(busy_until, start + float(e["dur"]))
    return gaps


def idle_per_step(
    trace, steps: int, top: int = 5, group_of=kernel_group
) -> tuple[float, dict[str, float]]:
    """(ms per step in which no GPU stream ran a kernel, between the first and the last;
    the `top` kernel groups (`group_of` a name) the GPU most waited for: ms per step of idle
    time just before each group's kernels, largest first, where launch overhead and host waits
    sit)."""
    gaps = idle_gaps(trace)
    waits = collections.Counter()
    for gap, name in gaps:
        waits[group_of(name)] += gap
    before = {group: us / 1e3 / steps for group, us in waits.most_common(top)}
    return sum(gap for gap, _ in gaps) / 1e3 / steps, before


def kernel_table(
    kernels: list[tuple[str, float]],
    steps: int,
    bytes_by_kernel: dict[str, int] | None = None,
    contents: dict[str, str] | None = None,
    group_of=kernel_group,
) -> list[dict]:
    """Groups (`group_of` a kernel name), largest first: ms and kernels per step, share of all
    kernel time; where `bytes_by_kernel` (fusion_bytes) knows a group's kernels, bytes per step
    and GB/s over the time of those kernels; and where `contents` (fusion_contents) knows the
    one kernel of a group, what it computes."""
    bytes_by_kernel, contents = bytes_by_kernel or {}, contents or {}
    time_us, count = collections.Counter(), collections.Counter()
    moved, moved_us = collections.Counter(), collections.Counter()
    names = collections.defaultdict(set)
    for name, duration in kernels:
        group = group_of(name)
        names[group].add(name)
        time_us[group] += duration
        count[group] += 1
        if name in bytes_by_kernel:
            moved[group] += bytes_by_kernel[name]
            moved_us[group] += duration
    total = sum(time_us.values()) or 1.0
    return [
        {
            "group": group,
            "kind": kernel_kind(group),
            "ms_per_step": us / 1e3 / steps,
            "kernels_per_step": count[group] / steps,
            "share": us / total,
            "bytes_per_step": moved[group] / steps if moved_us[group] else None,
            "gb_per_s": moved[group] / moved_us[group] / 1e3 if moved_us[group] else None,
            "what": contents.get(next(iter(names[group]))) if len(names[group]) == 1 else None,
        }
        for group, us in time_us.most_common()
    ]


def profile_one(args, impl: str) -> tuple[list[dict], dict]:
    """Trace --steps steps of the real step after --warmup; its kernel table and a summary."""
    import jax

    from jepa_jax import trainer

    config, mesh, net, state, tx, _, batch = real_step_inputs(args, impl)
    step = trainer.compile_step(config, net, tx, mesh, state).lower(state, batch).compile()
    hlo = step.as_text()
    for _ in range(args.warmup + 1):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    trace_dir = os.path.join(args.trace_dir, impl)
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        trace = json.load(f)
    group_of = kernel_alone if args.by == "kernel" else kernel_group
    table = kernel_table(
        device_kernels(trace), args.steps, fusion_bytes(hlo), fusion_contents(hlo), group_of
    )
    idle_ms, idle_before_ms = idle_per_step(trace, args.steps, group_of=group_of)
    by_kind = collections.Counter()
    for row in table:
        by_kind[row["kind"]] += row["ms_per_step"]
    summary = {
        "impl": impl,
        "traced_wall_ms_per_step": wall_ms,  # includes the profiler's own overhead
        "kernel_ms_per_step": sum(by_kind.values()),
        "kernel_ms_by_kind": dict(by_kind),
        "gpu_idle_ms_per_step": idle_ms,
        "gpu_idle_before_ms_per_step": idle_before_ms,
        "trace_dir": trace_dir,
    }
    return [{"impl": impl, **row} for row in table[: args.top]], summary


def run_profile(args) -> dict:
    rows, summaries = [], []
    for impl in args.impls.split(","):
        impl_rows, summary = profile_one(args, impl)
        rows += impl_rows
        summaries.append(summary)
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(summary["kernel_ms_by_kind"].items()))
        found = (
            f"{summary['kernel_ms_per_step']:.2f} ms of kernels per step ({kinds}), "
            f"GPU idle {summary['gpu_idle_ms_per_step']:.2f} ms per step between them"
        )
        waits = summary["gpu_idle_before_ms_per_step"]
        if waits:
            found += " (most before " + ", ".join(f"{g} {ms:.3f}" for g, ms in waits.items()) + ")"
        if not impl_rows:
            found = "no GPU kernels in the trace (on a CPU it holds host events only)"
        print(f"{impl}: {found}; trace in {summary['trace_dir']}", flush=True)
    return {"env": _environment(), "summaries": summaries, "rows": rows, "ratios": {}}


PROFILE_COLUMNS = (
    ("impl", lambda r: r["impl"], ""),
    ("kernel group", lambda r: r["group"], ""),
    ("kind", lambda r: r["kind"], ""),
    ("ms/step", lambda r: r["ms_per_step"], ".2f"),
    ("kernels/step", lambda r: r["kernels_per_step"], ".0f"),
    ("share", lambda r: 100 * r["share"], ".1f"),
    ("GB/s", lambda r: r.get("gb_per_s"), ".0f"),
    ("what", lambda r: (r.get("what") or "")[:90], ""),
)
