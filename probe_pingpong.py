"""Probe (issue 18): a ping-pong fused-dense GEMM, so the epilogue overlaps the matmul.

The kernel of commit 3951d1c shared each CTA tile between two compute warpgroups, so both ran
their epilogue (bias, exact GELU, the q/k/v split) at once while the tensor cores idled. Here each
compute warpgroup owns whole 128 x 128 tiles, alternating: warpgroup 0 takes a CTA's tiles 0, 2,
4..., warpgroup 1 tiles 1, 3, 5.... Variants, named rRdD[as]: R = 2, one shared-memory ring per
warpgroup; R = 1, one ring for both, the mainloops handed over in tile order; D WGMMAs left in
flight while the next K block's is issued; `as`, a cheaper erf (Abramowitz-Stegun 7.1.26) with
approximate math.

`python probe_pingpong.py` runs each (case, variant) in its own process (a hang or crash costs
only that row), checks it against a float32 reference and times it against XLA (median of 5 x 20
back-to-back calls, 3 rotating fresh random input sets); writes $OUT/probe_pingpong.json, prints a
table last. `python probe_pingpong.py CASE VARIANT` runs one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jepa_jax.models.layers import gelu

TILE_M, TILE_N, TILE_K = 128, 128, 64
EPI_M, EPI_N = 64, 64
SMEM_BYTES = 227 * 1024


def _gelu_f32(h, erf="exact"):
    z = h * math.sqrt(0.5)
    if erf == "exact":
        return 0.5 * h * (1.0 + lax.erf(z))
    a = jnp.abs(z)  # Abramowitz-Stegun 7.1.26, absolute error 1.5e-7
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    half = 0.5 * poly * jnp.exp(-a * a)
    return h * jnp.where(z >= 0, 1.0 - half, half)


def stages_for(values: int, rings: int, k_steps: int) -> int:
    """Ring depth that fits shared memory beside the output staging.

    One ring shared by both warpgroups: each warpgroup's barrier phases count only its own
    waits, so every slot must be filled an even number of times per tile (k_steps divisible by
    2 * stages) for the other warpgroup's tile to leave its phases where it expects them.
    """
    out_bytes = 2 * 2 * values * EPI_M * EPI_N * 2
    per_stage = rings * (TILE_M * TILE_K + TILE_K * TILE_N) * 2
    fit = (SMEM_BYTES - out_bytes - 2048) // per_stage
    if rings == 2:
        return fit
    return max(st for st in range(1, fit + 1) if k_steps % (2 * st) == 0)


def _kernel(
    x_gmem, w_gmem, b_gmem, *out_gmem, splits, epilogue, num_sms, snake_width, delay, rings, erf
):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x_gmem.shape
    n = w_gmem.shape[1]
    n_out = n // splits
    dtype = x_gmem.dtype
    m_tiles, n_tiles, k_steps = m // TILE_M, n // TILE_N, k // TILE_K
    tiles_per_out = n_out // TILE_N
    values = 2 if epilogue == "gelu+pre" else 1
    stages = stages_for(values, rings, k_steps)
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

    def ring_slot(j, s):
        """The ring and barrier index of tile j's k-step s."""
        ring, used = (lax.rem(j, 2), (j // 2) * k_steps + s) if rings == 2 else (0, j * k_steps + s)
        slot = lax.rem(used, stages)
        return ring, slot, ring * stages + slot, used

    def body(a_smem, b_smem, out_smem, a_full, b_full, consumed, turn):
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
                        act = _gelu_f32(pre.astype(jnp.float32), erf).astype(dtype)
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

            ordered = rings == 1

            def hand_over():
                """Both warpgroups meet: the next mainloop may start (see the comment below)."""
                if ordered:
                    plgpu.barrier_arrive(turn)
                    plgpu.barrier_wait(turn)

            # With one shared ring the mainloops must run strictly in tile order, or warpgroup 1
            # would wait on a slot still holding warpgroup 0's data. Warpgroup 0 runs
            # M, hand over, E, hand over; warpgroup 1 hand over, M, hand over, E; so tile j + 1's
            # mainloop starts once tile j's has ended, and an epilogue overlaps the other's
            # mainloop. Both loop the same number of times so the hand-overs pair up.
            @pl.loop(0, (my_tiles + 1) // 2)
            def _tile(i):
                j = 2 * i + wg
                mi, ni = tile_origin(j)
                pl.when(wg == 1)(hand_over)

                def mainloop(acc_ref):
                    def bar_of(s):
                        return ring_slot(2 * i + wg, s)[2]

                    @pl.loop(0, k_steps)
                    def _step(s):
                        ring, slot, bar, _ = ring_slot(2 * i + wg, s)
                        plgpu.barrier_wait(a_full.at[bar])
                        plgpu.barrier_wait(b_full.at[bar])
                        plgpu.wgmma(acc_ref, a_smem.at[ring, slot], b_smem.at[ring, slot])
                        # Keep `delay` WGMMAs in flight; release the slot the finished one read.
                        plgpu.wgmma_wait(delay)
                        if delay:
                            pl.when(s > 0)(lambda: plgpu.barrier_arrive(consumed.at[bar_of(s - 1)]))
                        else:
                            plgpu.barrier_arrive(consumed.at[bar])

                    if delay:
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(consumed.at[bar_of(k_steps - 1)])
                    return acc_ref[...]

                @pl.when(j < my_tiles)
                def _work():
                    acc = pl.run_scoped(mainloop, plgpu.ACC((TILE_M, TILE_N), jnp.float32))
                    hand_over()
                    _epilogue(acc, mi, ni)
                    pl.when(wg == 0)(hand_over)

                pl.when((j >= my_tiles) & (wg == 1))(hand_over)

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, my_tiles)
            def _tile(j):
                mi, ni = tile_origin(j)

                @pl.loop(0, k_steps)
                def _step(s):
                    owner, slot, bar, used = ring_slot(j, s)

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
        plgpu.SMEM((rings, stages, TILE_M, TILE_K), dtype, transforms=transforms(TILE_K)),
        plgpu.SMEM((rings, stages, TILE_K, TILE_N), dtype, transforms=transforms(TILE_K)),
        plgpu.SMEM((2, 2, values, EPI_M, EPI_N), dtype, transforms=transforms(EPI_N)),
        plgpu.Barrier(num_barriers=rings * stages),
        plgpu.Barrier(num_barriers=rings * stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=rings * stages),
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg",
    )


def fused_dense(
    x, w, b, *, epilogue="bias", splits=1, snake_width=16, delay=0, rings=1, erf="exact"
):
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
            _kernel,
            splits=splits,
            epilogue=epilogue,
            num_sms=num_sms,
            snake_width=snake_width,
            delay=delay,
            rings=rings,
            erf=erf,
        ),
        out_type=tuple(jax.ShapeDtypeStruct((m, n // splits), x.dtype) for _ in range(outputs)),
        grid=(num_sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane, approx_math=erf != "exact"
        ),
    )
    return tuple(call(x, w, b.astype(x.dtype).astype(jnp.float32)))


CASES = {  # name: (M, K, N, splits, epilogue)
    "fc1 bias": (32768, 1280, 5120, 1, "bias"),
    "fc1 target": (32768, 1280, 5120, 1, "gelu"),
    "fc1 context": (8704, 1280, 5120, 1, "gelu+pre"),
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
        rings, delay = int(impl[1]), int(impl[3])
        fn = functools.partial(
            fused_dense,
            epilogue=epilogue,
            splits=splits,
            delay=delay,
            rings=rings,
            erf="as" if impl.endswith("as") else "exact",
        )
    fn = jax.jit(fn)
    err = rel_err(fn(*inputs[0]), reference(*inputs[0], splits, epilogue))
    ms, spread = per_call_ms(fn, inputs)
    print("ROW " + json.dumps(dict(case=name, impl=impl, ms=ms, spread=spread, err=err)))


def main():
    import subprocess
    import sys

    rows, broken = [], set()
    for name in CASES:
        for impl in ("xla", "r1d1", "r1d1as") if "bias" not in name else ("xla", "r1d1"):
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
