"""Probe (issue 18): a ping-pong fused-dense GEMM, so the epilogue overlaps the matmul.

The kernel of commit 3951d1c shared each CTA tile between two compute warpgroups, so both ran
their epilogue (bias, exact GELU, the q/k/v split) at once while the tensor cores idled; the
epilogue added 0.16-0.19 ms to fc1's 0.61 ms (BENCHMARKS.md). Here each compute warpgroup owns
whole 128 x 128 tiles, alternating: warpgroup 0 takes a CTA's tiles 0, 2, 4..., warpgroup 1 tiles
1, 3, 5...; the memory warpgroup loads them in that order into one shared-memory ring per
warpgroup. So warpgroup 0's epilogue of tile j runs while warpgroup 1 multiplies tile j + 1.

`python probe_pingpong.py` checks each case against a float32 reference and times it against XLA
and against itself with the epilogue reduced to the bias (median of 5 x 20 back-to-back calls,
3 rotating fresh random input sets); writes $OUT/probe_pingpong.json, prints a table last.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jepa_jax.models.vit import gelu

TILE_M, TILE_N, TILE_K = 128, 128, 64
EPI_M, EPI_N = 64, 64
SMEM_BYTES = 227 * 1024


def _gelu_f32(h):
    return 0.5 * h * (1.0 + lax.erf(h * math.sqrt(0.5)))


def stages_for(values: int) -> int:
    """Ring depth per warpgroup that fits shared memory beside the output staging."""
    out_bytes = 2 * 2 * values * EPI_M * EPI_N * 2
    per_stage = 2 * (TILE_M * TILE_K + TILE_K * TILE_N) * 2  # both warpgroups' rings
    return (SMEM_BYTES - out_bytes - 2048) // per_stage


def _kernel(x_gmem, w_gmem, b_gmem, *out_gmem, splits, epilogue, num_sms, snake_width):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x_gmem.shape
    n = w_gmem.shape[1]
    n_out = n // splits
    dtype = x_gmem.dtype
    m_tiles, n_tiles, k_steps = m // TILE_M, n // TILE_N, k // TILE_K
    tiles_per_out = n_out // TILE_N
    values = 2 if epilogue == "gelu+pre" else 1
    stages = stages_for(values)
    sm = lax.axis_index("sm")
    # This CTA's tiles are sm, sm + num_sms, ...: j = 0 .. my_tiles - 1.
    my_tiles = (m_tiles * n_tiles - sm + num_sms - 1) // num_sms

    def transforms(cols):
        swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
        return (
            plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle),
        )

    def tile_origin(j):
        lin = sm + j * num_sms
        return plgpu.planar_snake(lin, (m_tiles, n_tiles), 1, snake_width)

    def body(a_smem, b_smem, out_smem, a_full, b_full, consumed):
        wg = lax.axis_index("wg")

        def _epilogue(acc, mi, ni):
            row0 = mi * TILE_M
            which = ni // tiles_per_out  # the output these columns belong to
            out_col0 = ni * TILE_N - which * n_out
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for em in range(TILE_M // EPI_M):
                for en in range(TILE_N // EPI_N):
                    rows = slice(em * EPI_M, (em + 1) * EPI_M)
                    cols = slice(en * EPI_N, (en + 1) * EPI_N)
                    bias = plgpu.load(
                        b_gmem.at[pl.ds(ni * TILE_N + en * EPI_N, EPI_N)],
                        (),
                        layout=plgpu.Layout.WGMMA.reduce(0),
                        optimized=False,
                    )
                    pre = acc[rows, cols] + lax.broadcast_in_dim(bias, (EPI_M, EPI_N), [1])
                    pre = pre.astype(dtype)  # where XLA's GEMM rounds
                    outs = [pre]
                    if epilogue != "bias":
                        act = _gelu_f32(pre.astype(jnp.float32)).astype(dtype)
                        outs = [act, pre] if values == 2 else [act]
                    slot = (em * (TILE_N // EPI_N) + en) % 2
                    plgpu.wait_smem_to_gmem(values, wait_read_only=True)
                    for v, value in enumerate(outs):
                        out_smem[wg, slot, v] = value
                    plgpu.commit_smem()
                    dst_rows = pl.ds(row0 + em * EPI_M, EPI_M)
                    dst_cols = pl.ds(out_col0 + en * EPI_N, EPI_N)
                    for v in range(values):
                        for o in range(splits):
                            dst = out_gmem[v * splits + o].at[dst_rows, dst_cols]
                            store = functools.partial(
                                plgpu.copy_smem_to_gmem, out_smem.at[wg, slot, v], dst
                            )
                            pl.when(which == o)(store)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")

            @pl.loop(0, (my_tiles - wg + 1) // 2)
            def _tile(i):
                mi, ni = tile_origin(2 * i + wg)

                def mainloop(acc_ref):
                    @pl.loop(0, k_steps)
                    def _step(s):
                        slot = lax.rem(i * k_steps + s, stages)
                        bar = wg * stages + slot
                        plgpu.barrier_wait(a_full.at[bar])
                        plgpu.barrier_wait(b_full.at[bar])
                        plgpu.wgmma(acc_ref, a_smem.at[wg, slot], b_smem.at[wg, slot])
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(consumed.at[bar])

                    return acc_ref[...]

                acc = pl.run_scoped(mainloop, plgpu.ACC((TILE_M, TILE_N), jnp.float32))
                _epilogue(acc, mi, ni)

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, my_tiles)
            def _tile(j):
                owner = lax.rem(j, 2)
                mi, ni = tile_origin(j)

                @pl.loop(0, k_steps)
                def _step(s):
                    used = (j // 2) * k_steps + s  # this ring's loads so far
                    slot = lax.rem(used, stages)
                    bar = owner * stages + slot

                    @pl.when(used >= stages)
                    def _wait_free():
                        plgpu.barrier_wait(consumed.at[bar])

                    plgpu.copy_gmem_to_smem(
                        x_gmem.at[pl.ds(mi * TILE_M, TILE_M), pl.ds(s * TILE_K, TILE_K)],
                        a_smem.at[owner, slot],
                        a_full.at[bar],
                    )
                    plgpu.copy_gmem_to_smem(
                        w_gmem.at[pl.ds(s * TILE_K, TILE_K), pl.ds(ni * TILE_N, TILE_N)],
                        b_smem.at[owner, slot],
                        b_full.at[bar],
                    )

    pl.run_scoped(
        body,
        plgpu.SMEM((2, stages, TILE_M, TILE_K), dtype, transforms=transforms(TILE_K)),
        plgpu.SMEM((2, stages, TILE_K, TILE_N), dtype, transforms=transforms(TILE_K)),
        plgpu.SMEM((2, 2, values, EPI_M, EPI_N), dtype, transforms=transforms(EPI_N)),
        plgpu.Barrier(num_barriers=2 * stages),
        plgpu.Barrier(num_barriers=2 * stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=2 * stages),
        collective_axes="wg",
    )


def fused_dense(x, w, b, *, epilogue="bias", splits=1, snake_width=8):
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.extend import backend

    m, k = x.shape
    n = w.shape[1]
    if m % TILE_M or k % TILE_K or (n // splits) % TILE_N:
        raise ValueError(f"M={m}, K={k}, N={n} / {splits} do not tile")
    num_sms = getattr(backend.get_default_device(), "core_count", 1)
    outputs = splits * (2 if epilogue == "gelu+pre" else 1)
    call = plgpu.kernel(
        functools.partial(
            _kernel, splits=splits, epilogue=epilogue, num_sms=num_sms, snake_width=snake_width
        ),
        out_type=tuple(jax.ShapeDtypeStruct((m, n // splits), x.dtype) for _ in range(outputs)),
        grid=(num_sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )
    return tuple(call(x, w, b.astype(x.dtype).astype(jnp.float32)))


CASES = {  # name: (M, K, N, splits, epilogue)
    "fc1 bias": (32768, 1280, 5120, 1, "bias"),
    "fc1 target": (32768, 1280, 5120, 1, "gelu"),
    "fc1 context": (8704, 1280, 5120, 1, "gelu+pre"),
    "qkv target": (32768, 1280, 3840, 3, "bias"),
    "fc2 bias": (32768, 5120, 1280, 1, "bias"),
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


def main():
    key = jax.random.key(int(time.time()))
    rows = []
    for name, (m, k, n, splits, epilogue) in CASES.items():
        key, *keys = jax.random.split(key, 10)
        inputs = [
            (
                jax.random.normal(keys[3 * i], (m, k), jnp.bfloat16),
                (jax.random.normal(keys[3 * i + 1], (k, n)) * k**-0.5).astype(jnp.bfloat16),
                jax.random.normal(keys[3 * i + 2], (n,)) * 0.5,
            )
            for i in range(3)
        ]
        refs = reference(*inputs[0], splits, epilogue)
        impls = {
            "xla": lambda x, w, b, s=splits, e=epilogue: xla_path(x, w, b, s, e),
            "pingpong": lambda x, w, b, s=splits, e=epilogue: fused_dense(
                x, w, b, epilogue=e, splits=s
            ),
        }
        for impl, fn in impls.items():
            fn = jax.jit(fn)
            try:
                err = rel_err(fn(*inputs[0]), refs)
                ms, spread = per_call_ms(fn, inputs)
            except Exception as e:  # noqa: BLE001 - a failure is a result here
                msg = f"{type(e).__name__}: {str(e)[:2000]}"
                print(f"{name}: {impl} FAILED {msg}", flush=True)
                traceback.print_exc(limit=4)
                rows.append(dict(case=name, impl=impl, error=msg))
                continue
            rows.append(dict(case=name, impl=impl, ms=ms, spread=spread, err=err))
            print(f"{name}: {impl} {ms:.3f} ms (spread {spread:.3f}) err {err:.2e}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_pingpong.json"), "w") as f:
        json.dump(dict(jax=jax.__version__, device=str(jax.devices()[0]), rows=rows), f, indent=1)
    print(f"\n{'case':<12} {'impl':<9} {'ms':>8} {'vs xla':>7} {'err':>9}")
    for name in CASES:
        base = next((r for r in rows if r["case"] == name and r["impl"] == "xla"), None)
        for r in (r for r in rows if r["case"] == name):
            if "error" in r or base is None or "ms" not in base:
                print(f"{name:<12} {r['impl']:<9} failed")
                continue
            print(
                f"{name:<12} {r['impl']:<9} {r['ms']:8.3f} {base['ms'] / r['ms']:7.3f} "
                f"{r['err']:9.2e}"
            )


if __name__ == "__main__":
    main()
