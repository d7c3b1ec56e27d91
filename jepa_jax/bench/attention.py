"""`attention` mode: each attention kernel alone at BxTxNxH shapes: time, TFLOP/s, temporary
memory and error against the float32 reference."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Sequence

import numpy as np

from jepa_jax.bench.common import _environment, _failure, _log, _memory, _note, _ratios

NUM_INPUT_SETS = 3  # rotated input sets per timing, so no cache holds the one input
ERROR_SEED = 1234  # fresh inputs for the error check, never used for timing


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
