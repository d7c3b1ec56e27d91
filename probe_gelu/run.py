"""Probe (issue 18): the fused-epilogue dense kernel (jepa_jax.kernels.dense) against XLA at
ViT-H/14's fc1 and qkv shapes, bf16, on a Hopper GPU.

For each case: relative error of the kernel and of XLA's path against a float32 reference on the
same bf16-rounded inputs (fresh random inputs each case), then the time per call (median of 5
repeats of 20 back-to-back calls, 3 rotating input sets). Writes $OUT/probe_dense.json and
prints a table last.
"""

import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import os as _os, sys as _sys
_sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
from dense import Tiling, fused_dense  # noqa: E402
from jepa_jax.models.vit import gelu

CASES = {  # name: (M, K, N, splits, epilogue)
    "fc1 bias": (32768, 1280, 5120, 1, "bias"),
    "fc1 target": (32768, 1280, 5120, 1, "gelu"),
    "fc1 context": (8704, 1280, 5120, 1, "gelu+pre"),
}


VARIANTS = {
    "exact": Tiling(),
    "as": Tiling(erf="as"),
    "as approx": Tiling(erf="as", approx_math=True),
}


def xla_path(x, w, b, splits, epilogue):
    """What the model runs now: bf16 Linear (bias in cuBLAS's epilogue), then the GELU pass or
    the unstack of q, k, v."""
    pre = jnp.dot(x, w) + b.astype(x.dtype)
    if epilogue == "bias":
        return tuple(jnp.split(pre, splits, axis=1))
    act = gelu(pre)
    return (act, pre) if epilogue == "gelu+pre" else (act,)


def reference(x, w, b, splits, epilogue):
    pre = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    pre = pre + b.astype(x.dtype).astype(jnp.float32)
    if epilogue == "bias":
        return tuple(jnp.split(pre, splits, axis=1))
    act = jax.nn.gelu(pre, approximate=False)
    return (act, pre) if epilogue == "gelu+pre" else (act,)


def rel_err(outs, refs):
    errs = []
    for o, r in zip(outs, refs, strict=True):
        o = np.asarray(o, np.float32)
        r = np.asarray(r, np.float32)
        if not np.all(np.isfinite(o)):
            return float("nan")
        errs.append(float(np.linalg.norm(o - r) / np.linalg.norm(r)))
    return max(errs)


def per_call_ms(fn, inputs, calls=20, repeats=5):
    for args in inputs:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for i in range(calls):
            out = fn(*inputs[i % len(inputs)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times), max(times) - min(times)


def main():
    variants = sys.argv[1].split(",") if len(sys.argv) > 1 else list(VARIANTS)
    key = jax.random.key(int(time.time()))
    rows = []
    for name, (m, k, n, splits, epilogue) in CASES.items():
        key, *keys = jax.random.split(key, 10)
        inputs = [
            (
                jax.random.normal(keys[3 * i], (m, k), jnp.bfloat16),
                (jax.random.normal(keys[3 * i + 1], (k, n), jnp.float32) * k**-0.5).astype(
                    jnp.bfloat16
                ),
                jax.random.normal(keys[3 * i + 2], (n,), jnp.float32) * 0.5,
            )
            for i in range(3)
        ]
        refs = reference(*inputs[0], splits, epilogue)
        xla = jax.jit(lambda x, w, b, s=splits, e=epilogue: xla_path(x, w, b, s, e))
        err = rel_err(xla(*inputs[0]), refs)
        ms, spread = per_call_ms(xla, inputs)
        rows.append(dict(case=name, impl="xla", ms=ms, spread=spread, err=err))
        print(f"{name}: xla {ms:.3f} ms (spread {spread:.3f}) err {err:.2e}", flush=True)
        for variant in variants:
            tiling = VARIANTS[variant]
            fused = jax.jit(
                lambda x, w, b, s=splits, e=epilogue, t=tiling: fused_dense(
                    x, w, b, epilogue=e, splits=s, tiling=t
                )
            )
            try:
                err = rel_err(fused(*inputs[0]), refs)
                ms, spread = per_call_ms(fused, inputs)
            except Exception as e:  # noqa: BLE001 - a variant that fails to build is a result
                msg = f"{type(e).__name__}: {str(e)[:1500]}"
                print(f"{name}: {variant} FAILED {msg}", flush=True)
                traceback.print_exc(limit=3)
                rows.append(dict(case=name, impl=variant, error=msg))
                continue
            exact_out = jax.jit(lambda x, w, b, s=splits, e=epilogue: fused_dense(
                x, w, b, epilogue=e, splits=s, tiling=VARIANTS["exact"]))(*inputs[0])
            mine = fused(*inputs[0])
            differ = float(np.mean(np.asarray(mine[0], np.float32) != np.asarray(exact_out[0], np.float32)))
            rows.append(dict(case=name, impl=variant, ms=ms, spread=spread, err=err, differ=differ))
            print(f"  differing elements vs exact kernel: {differ:.2e}", flush=True)
            print(f"{name}: {variant} {ms:.3f} ms (spread {spread:.3f}) err {err:.2e}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_dense.json"), "w") as f:
        json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), rows=rows), f, indent=1)
    print(f"\n{'case':<12} {'impl':<14} {'ms':>8} {'vs xla':>7} {'err':>9}")
    for name in CASES:
        base = next(r for r in rows if r["case"] == name and r["impl"] == "xla")
        for r in (r for r in rows if r["case"] == name):
            if "error" in r:
                print(f"{name:<12} {r['impl']:<14} failed")
                continue
            print(
                f"{name:<12} {r['impl']:<14} {r['ms']:8.3f} {base['ms'] / r['ms']:7.3f} "
                f"{r['err']:9.2e}"
            )


if __name__ == "__main__":
    main()
