"""Probe (issue 18): can a Pallas Mosaic GPU matmul match cuBLAS at ViT-H/14's MLP shapes?

Runs jax's own Hopper example kernel (jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu) over
a small grid of tile configs against XLA's dot (cuBLASLt) at fc1 (M 32768, K 1280, N 5120) and
fc2 (K 5120, N 1280), bf16, checking each result against the XLA dot. Median of 20 timed calls
after warm-up, wall clock around block_until_ready, rotating 3 input sets.
"""

import itertools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm


def timed(fn, inputs, reps=20):
    for a, b in inputs:
        jax.block_until_ready(fn(a, b))
    times = []
    for i in range(reps):
        a, b = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(a, b))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    results = []
    key = jax.random.key(int(time.time()))
    for name, (m, k, n) in {"fc1": (32768, 1280, 5120), "fc2": (32768, 5120, 1280)}.items():
        keys = jax.random.split(key, 6)
        inputs = [
            (
                jax.random.normal(keys[2 * i], (m, k), jnp.bfloat16),
                jax.random.normal(keys[2 * i + 1], (k, n), jnp.bfloat16),
            )
            for i in range(3)
        ]
        flops = 2 * m * k * n
        xla = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
        ref = np.asarray(xla(*inputs[0]), np.float32)
        ms = timed(xla, inputs)
        results.append(dict(shape=name, impl="xla", ms=ms, tflops=flops / ms / 1e9))
        print(f"{name} xla {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        grid = itertools.product((128, 256), (128, 256), (64,), (4,), hm.MatmulDimension, (4, 8))
        for tm, tn, tk, steps, wg, width in grid:
            config = hm.TuningConfig(
                tile_m=tm,
                tile_n=tn,
                tile_k=tk,
                max_concurrent_steps=steps,
                grid_tile_width=width,
                wg_dimension=wg,
            )
            label = f"tm{tm} tn{tn} tk{tk} wg{wg} w{width}"
            try:
                fn = jax.jit(lambda a, b, c=config: hm.matmul(a, b, None, c))
                out = np.asarray(fn(*inputs[0]), np.float32)
                err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                ms = timed(fn, inputs)
            except Exception as e:  # noqa: BLE001 - a config the kernel rejects is a result
                print(f"{name} {label}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            results.append(dict(shape=name, impl=label, ms=ms, tflops=flops / ms / 1e9, err=err))
            print(f"{name} {label}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s err {err:.1e}",
                  flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_pallas.json"), "w") as f:
        json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), results=results), f)
    print("\nbest per shape:")
    for shape in ("fc1", "fc2"):
        rows = [r for r in results if r["shape"] == shape]
        x = next(r for r in rows if r["impl"] == "xla")
        best = max((r for r in rows if r["impl"] != "xla"), key=lambda r: r["tflops"], default=None)
        if best:
            print(f"{shape}: xla {x['tflops']:.0f} TFLOP/s, pallas best {best['tflops']:.0f} "
                  f"({best['impl']}, {best['tflops'] / x['tflops']:.2f}x of xla)")


if __name__ == "__main__":
    main()
