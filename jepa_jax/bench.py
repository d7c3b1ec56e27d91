"""Benchmarks: attention kernels, I-JEPA training steps (img/s, MFU, memory), largest batch.

Usage (from the repo root; each run writes one JSON file and prints a table last on stdout):
  python -m jepa_jax.bench attention [--impls reference,xla,cudnn]
      [--shapes 256x196x12x64,128x69x16x80] [--dtype bfloat16] [--kv-lengths]
      [--reps 20] [--warmup 3] [--out bench_attention.json]
  python -m jepa_jax.bench train [--config vit_b16] [--set model.remat=True ...]
      [--impls cudnn,xla,reference] [--per-device-batch 128] [--steps 20] [--warmup 3]
      [--peak-tflops 989] [--out bench_train.json]
  python -m jepa_jax.bench max-batch [--config vit_h14] [--set KEY=VALUE ...] [--impls cudnn,xla]
      [--start 128] [--max-tries 7] [--multiple 8] [--out bench_max-batch.json]
  python -m jepa_jax.bench breakdown [--config vit_h14] [--impls cudnn] [--per-device-batch 128]
      [--reps 10] [--out bench_breakdown.json]   (each part of the step timed alone, in-process)

`train` and `max-batch` run every measurement in a fresh subprocess: a process's peak device
memory never resets, and an out-of-memory error must not poison the measurements after it. Their
parent never starts a JAX backend; call them from a process that has not either (on a GPU a
started backend reserves most of the memory the subprocesses need).
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTENTION_IMPLS = ("cudnn", "xla", "reference")
NUM_INPUT_SETS = 3  # rotated input sets per timing, so no cache holds the one input
NUM_IMAGE_BATCHES = 2  # distinct synthetic image batches rotated in `train`
ERROR_SEED = 1234  # fresh inputs for the error check, never used for timing
OOM_MARKERS = ("resource_exhausted", "out of memory", "outofmemory")
TRY_FIELDS = ("per_device_batch", "status", "reason", "compile_s", "peak_bytes")  # max-batch log


# ------------------------------------------------------------------------------ shared helpers


def load_config(preset: str, overrides: Sequence[str] = ()):
    """A preset of configs/default.py with `key=value` overrides (values as Python literals)."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    from configs import default

    config = default.get_config(preset)
    for item in overrides:
        key, sep, text = item.partition("=")
        *parents, leaf = key.strip().split(".")
        node = config
        for name in parents:
            node = node.get(name) if hasattr(node, "keys") else None
        if not sep or not hasattr(node, "keys") or leaf not in node:
            raise ValueError(
                f"--set {item!r}: expected KEY=VALUE with KEY an existing config field"
            )
        try:
            node[leaf] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            node[leaf] = text  # a bare word such as xla is a string
    return config


def _is_oom(text: str) -> bool:
    """Whether an error's headline says the device ran out of memory (pass the first line:
    other errors can quote allocator logs further down)."""
    text = text.lower()
    return any(marker in text for marker in OOM_MARKERS)


def _describe(e: BaseException) -> str:
    """One line naming an exception, short enough for a table cell and a JSON field."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def _failure(e: BaseException) -> dict:
    """status (oom or error) and reason of a failed measurement."""
    reason = _describe(e)
    return {"status": "oom" if _is_oom(reason) else "error", "reason": reason}


def _memory(compiled) -> dict:
    """XLA's compile-time memory estimate per device; total = temp + argument + output - alias."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return {}
    m = m[0] if isinstance(m, list | tuple) else m
    if m is None:
        return {}
    got = {
        key: int(getattr(m, f"{key}_size_in_bytes", 0) or 0)
        for key in ("temp", "argument", "output", "alias")
    }
    got["total"] = got["temp"] + got["argument"] + got["output"] - got["alias"]
    return {f"{key}_bytes": value for key, value in got.items()}


def _environment() -> dict:
    import jax

    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        # The allocator's settings bound what fits (by default it takes 75% of GPU memory).
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("XLA_PYTHON_")},
    }


def _ratio(a, b) -> float | None:
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def _ratios(rows: list[dict], metrics: Sequence[str]) -> dict:
    """metric(cudnn) / metric(other) for other in xla, reference, where both rows ran."""
    ok = {r["impl"]: r for r in rows if r.get("status") == "ok"}
    if "cudnn" not in ok:
        return {}
    return {
        f"cudnn/{other}": {m: _ratio(ok["cudnn"].get(m), ok[other].get(m)) for m in metrics}
        for other in ("xla", "reference")
        if other in ok
    }


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "GiB":
        return f"{value / 2**30:.2f}"
    if spec == "MiB":
        return f"{value / 2**20:.1f}"
    return format(value, spec) if spec else str(value)


def format_table(rows: list[dict], columns: Sequence[tuple[str, Callable[[dict], object], str]]):
    """Rows as an aligned text table; each column is (header, getter, format spec)."""
    cells = [[h for h, _, _ in columns]]
    cells += [[_fmt(get(r), spec) for _, get, spec in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _note(row: dict) -> str:
    return row["status"] if not row.get("reason") else f"{row['status']}: {row['reason'][:90]}"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ attention


def attention_flops(shape: Sequence[int], backward: bool = False) -> float:
    """FLOPs of attention on a BxTxNxH input, counted as flash-attention benchmarks count them.

    Forward 4*B*N*T^2*H (Q.K^T and P.V, 2*T^2*H each per head); backward 2.5x forward (dV, dP,
    dQ, dK plus recomputing Q.K^T); so forward + backward = 3.5x forward.
    """
    b, t, n, h = shape
    forward = 4.0 * b * n * t * t * h
    return 3.5 * forward if backward else forward


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(x) for x in text.lower().split("x"))
    if len(parts) != 4 or min(parts) < 1:
        raise ValueError(
            f"shape {text!r}: expected BATCHxTOKENSxHEADSxHEAD_DIM, e.g. 256x196x12x64"
        )
    return parts  # type: ignore[return-value]


def _attention_inputs(seed: int, shape, dtype, use_lengths: bool) -> tuple:
    """(q, k, v, kv_lengths or None, output cotangent) drawn from `seed`."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, dout = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    b, t = shape[:2]
    lengths = np.random.default_rng(seed).integers(max(1, t // 2), t + 1, b)
    return q, k, v, (jnp.asarray(lengths, jnp.int32) if use_lengths else None), dout


def _forward(fn, q, k, v, lengths, dout):
    del dout  # same signature as _forward_backward, so both take the same input sets
    return fn(q, k, v, kv_lengths=lengths)


def _forward_backward(fn, q, k, v, lengths, dout):
    """(out, dq, dk, dv) for output cotangent `dout`."""
    import jax

    out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, kv_lengths=lengths), q, k, v)
    return out, *pull(dout)


def _median_seconds(fn, input_sets: list, reps: int, warmup: int) -> float:
    """Median over `reps` of the time per call; each rep runs every input set, then syncs."""
    import jax

    for i in range(warmup):
        jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready([fn(*inputs) for inputs in input_sets])
        times.append((time.perf_counter() - start) / len(input_sets))
    return statistics.median(times)


def _rel_err(x, ref) -> float:
    import jax.numpy as jnp

    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.sqrt(jnp.sum(jnp.square(x - ref)) / jnp.sum(jnp.square(ref))))


def _attention_errors(fn, shape, dtype, use_lengths: bool) -> dict:
    """‖out - ref‖/‖ref‖ (and the worst of dq, dk, dv) against the float32 reference."""
    import jax
    import jax.numpy as jnp

    from jepa_jax.attention import reference_attention

    inputs = _attention_inputs(ERROR_SEED, shape, dtype, use_lengths)
    got = jax.jit(functools.partial(_forward_backward, fn))(*inputs)
    upcast = [x if x is None else x.astype(jnp.float32) for x in inputs]
    upcast[3] = inputs[3]  # lengths stay int32
    with jax.default_matmul_precision("highest"):
        want = jax.jit(functools.partial(_forward_backward, reference_attention))(*upcast)
    return {
        "rel_err": _rel_err(got[0], want[0]),
        "grad_rel_err": max(_rel_err(g, w) for g, w in zip(got[1:], want[1:], strict=True)),
    }


def bench_attention_one(impl: str, shape, dtype, use_lengths: bool, reps: int, warmup: int):
    """One row: times, TFLOP/s, temporary memory and errors of `impl` at `shape`."""
    import jax
    import jax.numpy as jnp

    from jepa_jax import attention as attention_lib

    dtype = jnp.dtype(dtype)
    row = {"impl": impl, "shape": list(shape), "dtype": dtype.name, "kv_lengths": use_lengths}
    reason = attention_lib.cudnn_unsupported(dtype, (shape[3],)) if impl == "cudnn" else None
    if reason:
        return {**row, "status": "unavailable", "reason": reason}
    fn = attention_lib.get(impl)
    try:
        sets = [_attention_inputs(s, shape, dtype, use_lengths) for s in range(NUM_INPUT_SETS)]
        for name, body in (("fwd", _forward), ("fwd_bwd", _forward_backward)):
            compiled = jax.jit(functools.partial(body, fn)).lower(*sets[0]).compile()
            seconds = _median_seconds(compiled, sets, reps, warmup)
            row[f"{name}_ms"] = seconds * 1e3
            row[f"{name}_tflops"] = attention_flops(shape, name == "fwd_bwd") / seconds / 1e12
            row[f"{name}_temp_bytes"] = _memory(compiled).get("temp_bytes")
        del sets, compiled
        row.update(_attention_errors(fn, shape, dtype, use_lengths))
    except Exception as e:  # noqa: BLE001 - one failing kernel must not end the benchmark
        return {**row, **_failure(e)}
    return {**row, "status": "ok", "reason": None}


def run_attention(args) -> dict:
    """Every impl at every shape, plus cudnn/other ratios of time and memory per shape."""
    shapes = [_parse_shape(s) for s in args.shapes.split(",")]
    rows = []
    for shape in shapes:
        for impl in args.impls.split(","):
            _log(f"attention: {impl} at {'x'.join(map(str, shape))}")
            rows.append(
                bench_attention_one(
                    impl, shape, args.dtype, args.kv_lengths, args.reps, args.warmup
                )
            )
    ratios = {
        "x".join(map(str, shape)): _ratios(
            [r for r in rows if r["shape"] == list(shape)],
            ("fwd_ms", "fwd_bwd_ms", "fwd_bwd_temp_bytes"),
        )
        for shape in shapes
    }
    return {"env": _environment(), "rows": rows, "ratios": ratios}


ATTENTION_COLUMNS = (
    ("impl", lambda r: r["impl"], ""),
    ("shape", lambda r: "x".join(map(str, r["shape"])), ""),
    ("fwd ms", lambda r: r.get("fwd_ms"), ".3f"),
    ("fwd+bwd ms", lambda r: r.get("fwd_bwd_ms"), ".3f"),
    ("fwd TF/s", lambda r: r.get("fwd_tflops"), ".1f"),
    ("f+b TF/s", lambda r: r.get("fwd_bwd_tflops"), ".1f"),
    ("f+b temp MiB", lambda r: r.get("fwd_bwd_temp_bytes"), "MiB"),
    ("rel err", lambda r: r.get("rel_err"), ".1e"),
    ("grad err", lambda r: r.get("grad_rel_err"), ".1e"),
    ("status", _note, ""),
)


# ------------------------------------------------------------------------------ train


def _block_flops(tokens: float, width: int, mlp_hidden: int) -> float:
    """Forward matmul FLOPs of one transformer block over `tokens` tokens."""
    t, d = tokens, width
    qkv, scores_values, proj, mlp = (
        2 * t * d * 3 * d,
        2 * 2 * t * t * d,
        2 * t * d * d,
        2 * 2 * t * d * mlp_hidden,
    )
    return qkv + scores_values + proj + mlp


def flops_per_image(config, spec, target_tokens: float | None = None) -> float:
    """Matmul FLOPs of one training step per image: the sum of `step_flops_by_part`."""
    return float(sum(step_flops_by_part(config, spec, target_tokens).values()))


def step_flops_by_part(config, spec, target_tokens: float | None = None) -> dict[str, float]:
    """Per image and step, by part (2*m*n*k per matmul; norms etc. ignored).

    With N = grid tokens, Kc = spec.num_context, Kt = spec.max_target (or `target_tokens`),
    M targets, block(T, D, F) = 2*T*D*3D + 4*T^2*D + 2*T*D*D + 4*T*D*F:
      target encoder, forward only:   E + L*block(N, D, F),   E = 2*N*(3*p^2)*D patch embed
      context encoder, fwd + bwd:     2*E + 3*L*block(Kc, D, F)
        (the embed runs on all N tokens before the gather; images need no gradient, so its
        backward is the weight gradient alone: 1x, not 2x)
      predictor, fwd + bwd:           3 * [2*Kc*D*Dp + M*(Lp*block(Kc+Kt, Dp, 4*Dp) + 2*Kt*Dp*D)]
        (its input embed runs once per image, before the M sequences are formed)
    Padded target tokens are executed work, so Kt = max_target counts them.
    """
    from jepa_jax.models import SIZES

    size, m = SIZES[config.model.variant], config.model
    n, p = spec.grid[0] * spec.grid[1], m.patch_size
    kc = spec.num_context
    kt = spec.max_target if target_tokens is None else target_tokens
    embed = 2 * n * 3 * p * p * size.width
    target = embed + size.depth * _block_flops(n, size.width, size.mlp_hidden)
    context = 2 * embed + 3 * size.depth * _block_flops(kc, size.width, size.mlp_hidden)
    sequences = m.pred_depth * _block_flops(kc + kt, m.pred_dim, 4 * m.pred_dim)
    sequences += 2 * kt * m.pred_dim * size.width
    predictor = 2 * kc * size.width * m.pred_dim + spec.num_targets * sequences
    return {"target": target, "context": context, "predictor": 3 * predictor}


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

    from jepa_jax import sharding, trainer

    mesh = sharding.make_mesh(config.mesh)
    net, state, tx = trainer.build(config, mesh)
    step_fn = trainer.compile_step(config, net, tx, mesh, state)
    local = config.batch_size // jax.process_count()
    side = config.model.image_size
    rng = np.random.default_rng(config.seed)
    count = min(NUM_IMAGE_BATCHES, 1 + args.warmup + args.steps)
    pool = [rng.integers(0, 256, (local, side, side, 3), np.uint8) for _ in range(count)]
    target_lens = []

    def batch_at(step: int) -> dict:
        host = trainer.local_batch(config, spec, pool[step % count], step)
        target_lens.append(int(host["target_len"][0, 0]))  # one block size per batch
        return sharding.global_batch(mesh, host)

    batch = batch_at(0)
    start = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    out.update(
        attention=net.attention.name,
        lower_s=lowered_at - start,
        compile_s=time.perf_counter() - lowered_at,
        xla_memory=_memory(compiled),
    )
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, batch))
    out["first_step_s"] = time.perf_counter() - start

    total = args.warmup + args.steps
    batch = batch_at(1) if total else None
    for i in range(1, args.warmup + 1):
        state, metrics = compiled(state, batch)
        batch = batch_at(i + 1)
    jax.block_until_ready((state, metrics))
    # Steady state as train.py runs it: steps dispatched back to back, the host preparing the
    # next batch while the device works, one synchronisation at the end. Syncing every step
    # would add a launch bubble per step (~2800 kernels per B/16 step) that training never sees.
    start = time.perf_counter()
    for i in range(args.warmup + 1, total + 1):
        state, metrics = compiled(state, batch)
        batch = batch_at(i + 1) if i < total else None
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
        config = load_config(args.config, args.set)
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
        cmd += [x for item in args.set for x in ("--set", item)]
        cmd += ["--impls", impl, "--per-device-batch", str(per_device_batch)]
        cmd += ["--steps", str(steps), "--warmup", str(warmup), "--_child", path]
        cmd += ["--peak-tflops", str(getattr(args, "peak_tflops", 989.0))]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
        }
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO_ROOT,
                env=env,
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


# ------------------------------------------------------------------------------ max-batch


def max_batch_one(args, impl: str) -> tuple[dict, dict | None]:
    """Grow the per-device batch x2 from --start until OOM, then bisect; at most --max-tries."""
    tries: list[dict] = []
    env = None

    def attempt(batch: int) -> str:
        nonlocal env
        _log(f"max-batch: {impl} per-device batch {batch}")
        result = _spawn(args, impl, batch, steps=0, warmup=0)
        env = env or result["env"]
        r = result["row"]
        _log(f"  -> {r['status']}" + (f": {r['reason']}" if r.get("reason") else ""))
        xla_bytes = (r.get("xla_memory") or {}).get("total_bytes")
        tries.append({k: r.get(k) for k in TRY_FIELDS} | {"xla_total_bytes": xla_bytes})
        return r["status"]

    def midpoint(lo: int, hi: int) -> int:
        return (lo + hi) // 2 // args.multiple * args.multiple

    lo, hi, batch, status = 0, None, args.start, "ok"  # lo runs, hi ran out of memory
    while status == "ok" and len(tries) < args.max_tries:
        status = attempt(batch)
        if status == "ok":
            lo, batch = batch, batch * 2
        elif status == "oom":
            hi = batch
    while status in ("ok", "oom") and hi is not None and len(tries) < args.max_tries:
        if midpoint(lo, hi) <= lo:
            break
        batch = midpoint(lo, hi)
        status = attempt(batch)
        lo, hi = (batch, hi) if status == "ok" else (lo, batch)
    failure = next((t for t in tries if t["status"] not in ("ok", "oom")), None)
    resolved = hi is not None and midpoint(lo, hi) <= lo
    devices = (env or {}).get("devices")
    row = {
        "impl": impl,
        "status": failure["status"] if failure else "ok",
        "reason": failure["reason"]
        if failure
        else (None if resolved else "stopped at --max-tries"),
        "max_per_device_batch": lo,
        "global_batch": lo * devices if devices else None,
        "smallest_oom_per_device_batch": hi,
        "resolved": resolved,
        "tries": tries,
    }
    return row, env


def run_max_batch(args) -> dict:
    rows, env = [], None
    for impl in args.impls.split(","):
        row, found = max_batch_one(args, impl)
        rows.append(row)
        env = env or found
    return {"env": env, "rows": rows, "ratios": _ratios(rows, ("max_per_device_batch",))}


def _median_ms(fn, *args, reps: int) -> float:
    """Median wall time of a jitted call (after one untimed call that compiles it)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def breakdown_rows(args, impl: str) -> list[dict]:
    """Time each part of the step alone (jitted separately, so fusion across parts is lost)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jepa_jax import data, masks, optim, sharding, trainer

    config = load_config(args.config, args.set)
    config.model.attention = impl
    config.batch_size = args.per_device_batch * jax.device_count()
    mesh = sharding.make_mesh(config.mesh)
    net, state, tx = trainer.build(config, mesh)
    spec = masks.mask_spec(config)
    side = config.model.image_size
    images = np.random.default_rng(0).integers(0, 256, (config.batch_size, side, side, 3), np.uint8)
    batch = sharding.global_batch(mesh, trainer.local_batch(config, spec, images, 0))

    def context_loss(p, b):
        encoder = nnx.merge(net.encoder, p)
        return encoder(data.normalize(b["images"]), b["context_idx"]).astype(jnp.float32).mean()

    def predictor_loss(p, ctx, b):
        out = nnx.merge(net.predictor, p)(ctx, b["context_idx"], b["target_idx"], b["target_len"])
        return out.astype(jnp.float32).mean()

    def update(s, grads):
        updates, _ = tx.update(grads, s.opt_state, s.params)
        params = optax.apply_updates(s.params, updates)
        return params, optim.ema_update(s.target, params["encoder"], 0.99)

    def context_forward(p, b):
        return nnx.merge(net.encoder, p)(data.normalize(b["images"]), b["context_idx"])

    ctx = jax.jit(context_forward)(state.params["encoder"], batch)
    grads = jax.tree.map(jnp.ones_like, state.params)
    step = jax.jit(
        functools.partial(trainer.train_step, net=net, tx=tx, sched=optim.schedules(config))
    )
    flops = step_flops_by_part(config, spec)
    parts = (
        (
            "target encoder fwd",
            flops["target"],
            jax.jit(functools.partial(trainer.target_features, net)),
            (state.target, batch),
        ),
        (
            "context encoder fwd+bwd",
            flops["context"],
            jax.jit(jax.grad(context_loss)),
            (state.params["encoder"], batch),
        ),
        (
            "predictor fwd+bwd",
            flops["predictor"],
            jax.jit(jax.grad(predictor_loss, argnums=(0, 1))),
            (state.params["predictor"], ctx, batch),
        ),
        ("adamw + ema", 0.0, jax.jit(update), (state, grads)),
        ("whole step", sum(flops.values()), step, (state, batch)),
    )
    rows = []
    for name, part_flops, fn, fn_args in parts:
        ms = _median_ms(fn, *fn_args, reps=args.reps)
        achieved = part_flops * config.batch_size / (ms / 1e3)
        rows.append({"impl": impl, "part": name, "ms": ms, "tflops_per_s": achieved / 1e12 or None})
    return rows


def run_breakdown(args) -> dict:
    rows = [row for impl in args.impls.split(",") for row in breakdown_rows(args, impl)]
    return {"env": _environment(), "rows": rows, "ratios": {}}


BREAKDOWN_COLUMNS = (
    ("impl", lambda r: r["impl"], ""),
    ("part", lambda r: r["part"], ""),
    ("ms", lambda r: r["ms"], ".2f"),
    ("TFLOP/s", lambda r: r["tflops_per_s"], ".0f"),
)


MAX_BATCH_COLUMNS = (
    ("impl", lambda r: r["impl"], ""),
    ("max per-device batch", lambda r: r["max_per_device_batch"], ""),
    ("global", lambda r: r.get("global_batch"), ""),
    ("smallest OOM", lambda r: r.get("smallest_oom_per_device_batch"), ""),
    ("tries", lambda r: len(r["tries"]), ""),
    ("status", _note, ""),
)


# ------------------------------------------------------------------------------ CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jepa_jax.bench", description=__doc__.split("\n")[0]
    )
    modes = parser.add_subparsers(dest="mode", required=True)
    att = modes.add_parser(
        "attention", help="attention kernels alone: time, TFLOP/s, memory, error"
    )
    att.add_argument("--impls", default="reference,xla,cudnn")
    att.add_argument("--shapes", default="256x196x12x64,128x69x16x80", help="BxTxNxH,...")
    att.add_argument("--dtype", default="bfloat16")
    att.add_argument("--kv-lengths", action="store_true", help="random kv lengths in [T/2, T]")
    att.add_argument("--reps", type=int, default=20)
    att.add_argument("--warmup", type=int, default=3)
    for name, preset, impls in (
        ("train", "vit_b16", "cudnn,xla,reference"),
        ("max-batch", "vit_h14", "cudnn,xla"),
        ("breakdown", "vit_h14", "cudnn"),
    ):
        p = modes.add_parser(name, help=f"{name} with the real trainer step, one process per run")
        p.add_argument("--config", default=preset, help="preset of configs/default.py")
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
        )
        p.add_argument("--impls", default=impls)
        p.add_argument("--child-timeout", type=float, default=1200.0, help="seconds per subprocess")
    train, search = modes.choices["train"], modes.choices["max-batch"]
    parts = modes.choices["breakdown"]
    parts.add_argument("--per-device-batch", type=int, default=128)
    parts.add_argument("--reps", type=int, default=10)
    train.add_argument("--per-device-batch", type=int, default=128)
    train.add_argument("--steps", type=int, default=20, help="timed steps")
    train.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    train.add_argument("--peak-tflops", type=float, default=989.0, help="per device, H100 bf16")
    train.add_argument("--_child", help=argparse.SUPPRESS)  # internal: one measurement -> PATH
    search.add_argument("--start", type=int, default=128, help="first per-device batch")
    search.add_argument("--max-tries", type=int, default=7, help="subprocesses per impl")
    search.add_argument("--multiple", type=int, default=8, help="bisect to multiples of this")
    for p in modes.choices.values():
        p.add_argument("--out", help="JSON path (default bench_<mode>.json)")
    args = parser.parse_args(argv)
    allowed = ATTENTION_IMPLS if args.mode == "attention" else ATTENTION_IMPLS + ("auto",)
    bad = [i for i in args.impls.split(",") if i not in allowed]
    if bad:
        parser.error(f"--impls: unknown {bad}; choose from {','.join(allowed)}")
    return args


MODES = {
    "attention": (run_attention, ATTENTION_COLUMNS),
    "train": (run_train, TRAIN_COLUMNS),
    "max-batch": (run_max_batch, MAX_BATCH_COLUMNS),
    "breakdown": (run_breakdown, BREAKDOWN_COLUMNS),
}


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Run one mode, write its JSON, print the ratios and then the table; returns the result."""
    args = parse_args(argv)
    if getattr(args, "_child", None):
        _child_main(args)
        return None
    run, columns = MODES[args.mode]
    result = {
        "mode": args.mode,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
    }
    result.update(run(args))
    out = args.out or f"bench_{args.mode}.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    for shape, ratios in result["ratios"].items():
        print(f"{shape}: {json.dumps(ratios)}")
    print(format_table(result["rows"], columns), flush=True)
    return result


if __name__ == "__main__":
    main()
