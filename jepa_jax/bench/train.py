"""`train` mode: the real trainer step on synthetic images, timed in a fresh subprocess per
measurement (`train --_child PATH`), reporting img/s, MFU and peak memory."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from jepa_jax.bench.common import (
    REPO_ROOT,
    _describe,
    _environment,
    _failure,
    _is_oom,
    _log,
    _memory,
    _note,
    _ratios,
    load_config,
)
from jepa_jax.flops import flops_per_image

NUM_IMAGE_BATCHES = 2  # distinct synthetic image batches rotated in `train`


def _peak_device_memory() -> dict:
    """Largest peak_bytes_in_use over local devices (None where the backend keeps no stats)."""
    import jax

    try:
        stats = [d.memory_stats() for d in jax.local_devices()]
    except Exception:  # noqa: BLE001
        stats = []
    stats = [s for s in stats if s]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    limits = [s["bytes_limit"] for s in stats if "bytes_limit" in s]
    return {"peak_bytes": max(peaks, default=None), "bytes_limit": min(limits, default=None)}


def _timed_steps(config, spec, args, out: dict) -> None:
    """Build, compile and run the real step on synthetic images with real masks, filling `out`
    as it goes (so a step that runs out of memory still reports its compile time and XLA's
    memory estimate)."""
    import jax

    from jepa_jax import data, sharding, trainer
    from jepa_jax.models import fp8

    mesh = sharding.make_mesh(config.mesh)
    net, state, tx = trainer.build(config, mesh)
    step_fn = trainer.compile_step(config, net, tx, mesh, state)
    local = config.batch_size // jax.process_count()
    side = config.model.image_size
    rng = np.random.default_rng(config.seed)
    count = min(NUM_IMAGE_BATCHES, 1 + args.warmup + args.steps)
    pool = [rng.integers(0, 256, (local, side, side, 3), np.uint8) for _ in range(count)]
    target_lens = []

    def host_batches():
        for step in itertools.count():
            host = data.synthetic_batch(config, spec, pool[step % count], step)
            target_lens.append(float(host["target_len"].mean()))  # a block size per mask group
            yield host

    # Fed as train.py feeds them: each batch put on the device a step before its own.
    batches = sharding.device_batches(mesh, host_batches())
    batch = next(batches)
    start = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    out.update(
        attention=net.attention.name,
        fused_qkv=net.fused_qkv.on,
        short_attention_backward=net.attention.short_backward,
        gelu_kernel=net.gelu_kernel.on,
        gelu=net.gelu_kernel.formula,
        fp8=fp8.setting(config.model),
        dtype=config.model.dtype,
        residual_dtype=config.model.residual_dtype,
        remat=config.model.remat,
        lower_s=lowered_at - start,
        compile_s=time.perf_counter() - lowered_at,
        xla_memory=_memory(compiled),
    )
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, batch))
    out["first_step_s"] = time.perf_counter() - start

    total = args.warmup + args.steps
    for _ in range(args.warmup):
        state, metrics = compiled(state, next(batches))
    jax.block_until_ready((state, metrics))
    # Steady state as train.py runs it: steps dispatched back to back, the host preparing the
    # next batch while the device works, one synchronisation at the end. Syncing every step
    # would add a launch bubble per step (~2800 kernels per B/16 step) that training never sees.
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, next(batches))
    jax.block_until_ready((state, metrics))
    window = time.perf_counter() - start
    useful = [flops_per_image(config, spec, target_tokens=t) for t in target_lens[: total + 1]]
    out.update(
        step_ms=window / args.steps * 1e3 if args.steps else None,
        useful_flops_per_image=statistics.mean(useful),
        loss=float(metrics["loss"]),
        **_peak_device_memory(),
    )


def train_row(args, impl: str, per_device_batch: int) -> dict:
    """One impl's row: build and time it here; failures become the row's status and reason."""
    import jax

    from jepa_jax import attention as attention_lib
    from jepa_jax import configuration, masks

    devices = jax.device_count()
    row = {
        "impl": impl,
        "per_device_batch": per_device_batch,
        "global_batch": per_device_batch * devices,
    }
    try:
        config = load_config(args.config, args.overrides)
        config.model.attention = impl
        config.batch_size = per_device_batch * devices
        config.total_steps = max(config.total_steps, 1000)  # keeps warmup/cosine schedules sane
        configuration.validate(config)
        spec = masks.mask_spec(config)
        row["flops_per_image"] = flops_per_image(config, spec)
        _timed_steps(config, spec, args, row)
    except attention_lib.AttentionUnavailableError as e:
        return {**row, "status": "unavailable", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - classify and report, the parent decides what next
        return {**row, **_failure(e)}
    if row["step_ms"]:
        row["img_per_s"] = row["global_batch"] / (row["step_ms"] / 1e3)
        achieved = row["flops_per_image"] * row["img_per_s"]
        row["tflops_per_s"] = achieved / 1e12
        row["mfu"] = achieved / (args.peak_tflops * 1e12 * devices)
    return {**row, "status": "ok", "reason": None}


def _child_main(args) -> None:
    """`--_child PATH`: measure the single impl of --impls and write {env, row} to PATH."""
    try:
        result = {"env": _environment(), "row": train_row(args, args.impls, args.per_device_batch)}
    except Exception as e:  # noqa: BLE001 - the parent must always get a row
        result = {
            "env": None,
            "row": {"impl": args.impls, "status": "error", "reason": _describe(e)},
        }
    with open(args._child, "w") as f:
        json.dump(result, f)


def _spawn(args, impl: str, per_device_batch: int, steps: int, warmup: int) -> dict:
    """Run one measurement in a fresh process; {env, row} even if that process dies."""
    failed = {"impl": impl, "per_device_batch": per_device_batch, "status": "error"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "jepa_jax.bench", "train", "--config", args.config]
        cmd += args.overrides
        cmd += ["--impls", impl, "--per-device-batch", str(per_device_batch)]
        cmd += ["--steps", str(steps), "--warmup", str(warmup), "--_child", path]
        cmd += ["--peak-tflops", str(getattr(args, "peak_tflops", 989.0))]
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=args.child_timeout,
            )
        except subprocess.TimeoutExpired:
            return {
                "env": None,
                "row": {**failed, "reason": f"timed out after {args.child_timeout:g} s"},
            }
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
    status = "oom" if _is_oom(tail) else "error"
    return {
        "env": None,
        "row": {**failed, "status": status, "reason": f"exit {proc.returncode}: {tail}"[:500]},
    }


def run_train(args) -> dict:
    """Every impl in its own process; ratios cudnn/other of img/s and peak memory."""
    rows, env = [], None
    for impl in args.impls.split(","):
        _log(f"train: {impl}, {args.config}, per-device batch {args.per_device_batch}")
        result = _spawn(args, impl, args.per_device_batch, args.steps, args.warmup)
        env = env or result["env"]
        rows.append(result["row"])
    ratios = _ratios(rows, ("img_per_s", "peak_bytes", "step_ms"))
    return {"env": env, "rows": rows, "ratios": ratios}


TRAIN_COLUMNS = (
    ("impl", lambda r: r["impl"], ""),
    ("ran", lambda r: r.get("attention"), ""),
    ("batch", lambda r: r.get("global_batch"), ""),
    ("compile s", lambda r: r.get("compile_s"), ".1f"),
    ("step ms", lambda r: r.get("step_ms"), ".1f"),
    ("img/s", lambda r: r.get("img_per_s"), ".1f"),
    ("GFLOP/img", lambda r: (r.get("flops_per_image") or 0) / 1e9 or None, ".2f"),
    ("MFU %", lambda r: r["mfu"] * 100 if r.get("mfu") is not None else None, ".1f"),
    ("peak GiB", lambda r: r.get("peak_bytes"), "GiB"),
    ("XLA GiB", lambda r: (r.get("xla_memory") or {}).get("total_bytes"), "GiB"),
    ("loss", lambda r: r.get("loss"), ".4f"),
    ("status", _note, ""),
)
