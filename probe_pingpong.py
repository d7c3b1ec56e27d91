"""Probe (issue 18): what the ping-pong fused dense kernel's GELU epilogue spends its time on.

`jepa_jax.kernels.dense` (commit 7ce2252 and after) runs a warpgroup's epilogue while the other
multiplies; with the bias alone that hides, with the exact GELU it sets the pace (fc1 + GELU
0.11-0.18 ms over the bias-only call; BENCHMARKS.md). Variants, as `Tiling` knobs of the kernel:
`7ce2252` loads the bias per sub-tile after the mainloop (as measured then); `early` loads it
before the mainloop (the default now); `as` adds the cheaper erf; `skip` drops the GELU's
arithmetic (timing only: its outputs are not the GELU, so its error column is meaningless);
`wide` stores 64 x 128 sub-tiles instead of 64 x 64.

`python probe_pingpong.py` runs each (case, variant) in its own process (a hang or crash costs
only that row), checks it against a float32 reference and times it against XLA (median of 5 x 20
back-to-back calls, 3 rotating fresh random input sets); writes $OUT/probe_pingpong.json, prints a
table last. `python probe_pingpong.py CASE VARIANT` runs one.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jepa_jax.kernels.dense import Tiling, fused_dense
from jepa_jax.models.layers import gelu

CASES = {  # name: (M, K, N, splits, epilogue)
    "fc1 bias": (32768, 1280, 5120, 1, "bias"),
    "fc1 target": (32768, 1280, 5120, 1, "gelu"),
    "fc1 context": (8704, 1280, 5120, 1, "gelu+pre"),
    "qkv target": (32768, 1280, 3840, 3, "bias"),
    "B/16 fc1 target": (25088, 768, 3072, 1, "gelu"),
    "B/16 qkv target": (25088, 768, 2304, 3, "bias"),
}
VARIANTS = {
    "7ce2252": Tiling(bias_early=False),
    "early": Tiling(),
    "as": Tiling(gelu_math="as"),
    "skip": Tiling(gelu_math="skip"),
    "wide": Tiling(epi_n=128),  # 64 x 128 sub-tiles: half as many stores and waits per tile
}
PLAN = {  # the variants each case runs: about 10 s each, so the device call stays under 10 minutes
    "fc1 bias": ["xla", "7ce2252", "early"],
    "fc1 target": ["xla", *VARIANTS],
    "fc1 context": ["xla", "early", "skip"],
    "qkv target": ["xla", "early"],
    "B/16 fc1 target": ["xla", "early", "skip", "wide"],
    "B/16 qkv target": ["xla", "early"],
}


def xla_path(x, w, b, splits, epilogue):
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
        o, r = np.asarray(o, np.float32), np.asarray(r, np.float32)
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


def run_one(name, impl):
    """Time one (case, impl) in this process; print one JSON line."""
    m, k, n, splits, epilogue = CASES[name]
    keys = jax.random.split(jax.random.key(int(time.time())), 9)
    inputs = [
        (
            jax.random.normal(keys[3 * i], (m, k), jnp.bfloat16),
            (jax.random.normal(keys[3 * i + 1], (k, n)) * k**-0.5).astype(jnp.bfloat16),
            jax.random.normal(keys[3 * i + 2], (n,)) * 0.5,
        )
        for i in range(3)
    ]
    if impl == "xla":
        fn = functools.partial(xla_path, splits=splits, epilogue=epilogue)
    else:
        fn = functools.partial(fused_dense, epilogue=epilogue, splits=splits, tiling=VARIANTS[impl])
    fn = jax.jit(fn)
    err = rel_err(fn(*inputs[0]), reference(*inputs[0], splits, epilogue))
    ms, spread = per_call_ms(fn, inputs)
    print("ROW " + json.dumps(dict(case=name, impl=impl, ms=ms, spread=spread, err=err)))


def main():
    import subprocess
    import sys

    rows, broken = [], set()
    for name in CASES:
        impls = PLAN[name]
        for impl in impls:
            if impl in broken:  # a hang or crash once is enough; spare the device time
                continue
            try:
                proc = subprocess.run(
                    [sys.executable, "-W", "ignore", __file__, name, impl],
                    capture_output=True,
                    text=True,
                    timeout=40,
                )
                found = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
                row = (
                    json.loads(found[0][4:])
                    if found
                    else dict(
                        case=name,
                        impl=impl,
                        error=(proc.stderr.strip().splitlines() or ["?"])[0][:300],
                    )
                )
            except subprocess.TimeoutExpired:
                row = dict(case=name, impl=impl, error="timeout (deadlock?)")
            if "error" in row:
                broken.add(impl)
            rows.append(row)
            print(row, flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_pingpong.json"), "w") as f:
        json.dump(dict(jax=jax.__version__, rows=rows), f, indent=1)
    print(f"\n{'case':<12} {'impl':<6} {'ms':>8} {'vs xla':>7} {'err':>9}")
    for name in CASES:
        base = next(
            (r for r in rows if r["case"] == name and "ms" in r and r["impl"] == "xla"), None
        )
        for r in (r for r in rows if r["case"] == name):
            if "ms" not in r or base is None:
                print(f"{name:<12} {r['impl']:<6} failed: {r.get('error', '')[:80]}")
                continue
            print(
                f"{name:<12} {r['impl']:<6} {r['ms']:8.3f} {base['ms'] / r['ms']:7.3f} "
                f"{r['err']:9.2e}"
            )


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3:
        run_one(*sys.argv[1:])
    else:
        main()
