"""A Linear layer whose output is written as separate column blocks (q, k, v) by the matmul
itself: one Pallas (Mosaic GPU) kernel for Hopper GPUs.

XLA runs the q/k/v projection as a cuBLAS GEMM (bias in its epilogue), then copies its output
once more to unstack q, k and v into the arrays cuDNN reads. Here the epilogue adds the bias,
rounds to bf16 (where XLA's GEMM rounds) and writes each column block straight to its own
output: the activation crosses device memory once. (The same kernel with the exact GELU as its
epilogue, for fc1, was measured and not kept: the GELU outlasts the other warpgroup's matmul;
BENCHMARKS.md.)

Structure: a persistent, warp-specialised "ping-pong" GEMM. One memory warpgroup streams
[tile_m, tile_k] and [tile_k, tile_n] blocks into one shared-memory ring (TMA), in tile order.
Two compute warpgroups take a CTA's tiles in turn (0 takes tiles 0, 2, 4..., 1 takes 1, 3,
5...), each multiplying a whole tile into its own float32 accumulator (WGMMA), so one runs its
epilogue (which uses no tensor cores) while the other multiplies the next tile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Tiling:
    tile_m: int = 128
    tile_n: int = 128  # one compute warpgroup's tile is [tile_m, tile_n]
    tile_k: int = 64
    stages: int = 6  # K blocks in flight, at most
    epi_m: int = 64
    epi_n: int = 64
    snake_width: int = 16  # tiles per band of the space-filling tile order
    mma_in_flight: int = 1  # WGMMAs left running while the next K block's is issued


_SMEM_BYTES = 227 * 1024  # per block on Hopper


def tiling_for(m: int, k: int, n_out: int) -> Tiling | None:
    """The tiling that fits these shapes (each output's columns a whole number of tiles) and
    shared memory, or None where none does (the caller then uses XLA).

    Each compute warpgroup counts barrier phases by its own waits only, so every ring slot must
    be filled an even number of times per tile: the ring depth divides k / tile_k / 2. Then the
    other warpgroup's tile leaves every phase where the next tile's waits expect it.
    """
    base = Tiling()
    for tile_n in (base.tile_n, 64):
        t = dataclasses.replace(base, tile_n=tile_n, epi_n=min(base.epi_n, tile_n))
        if m % t.tile_m or k % t.tile_k or n_out % t.tile_n:
            continue
        k_steps = k // t.tile_k
        out_bytes = 2 * 2 * t.epi_m * t.epi_n * 2
        stage_bytes = (t.tile_m * t.tile_k + t.tile_k * t.tile_n) * 2
        fit = min(t.stages, (_SMEM_BYTES - out_bytes - 1024) // stage_bytes)
        stages = max((s for s in range(1, fit + 1) if k_steps % (2 * s) == 0), default=0)
        if stages >= 2:
            return dataclasses.replace(t, stages=stages)
    return None


def width_tiles(width: int) -> bool:
    """Whether a q/k/v projection of this width (in and per output) has a tiling, for rows that
    are a whole number of row tiles."""
    return tiling_for(Tiling().tile_m, width, width) is not None


def _kernel(x_gmem, w_gmem, b_gmem, *out_gmem, t: Tiling, splits, num_sms):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x_gmem.shape
    n = w_gmem.shape[1]
    n_out = n // splits
    dtype = x_gmem.dtype
    m_tiles, n_tiles, k_steps = m // t.tile_m, n // t.tile_n, k // t.tile_k
    tiles_per_out = n_out // t.tile_n
    sm = lax.axis_index("sm")
    my_tiles = (m_tiles * n_tiles - sm + num_sms - 1) // num_sms  # tiles sm, sm + num_sms, ...

    def smem_transforms(cols):
        itemsize = jnp.dtype(dtype).itemsize
        swizzle = plgpu.find_swizzle(cols * itemsize * 8)
        return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)

    def tile_origin(j):
        return plgpu.planar_snake(sm + j * num_sms, (m_tiles, n_tiles), 1, t.snake_width)

    def slot_of(j, s):
        """The ring slot of this CTA's tile j, K block s."""
        return lax.rem(j * k_steps + s, t.stages)

    def body(x_smem, w_smem, out_smem, x_full, w_full, consumed, turn):
        wg = lax.axis_index("wg")

        def load_bias(ni):
            """The bias of this tile's columns, one sub-tile's worth at a time."""
            return [
                plgpu.load(
                    b_gmem.at[pl.ds(ni * t.tile_n + en * t.epi_n, t.epi_n)],
                    (),
                    layout=plgpu.Layout.WGMMA.reduce(0),
                    optimized=False,
                )
                for en in range(t.tile_n // t.epi_n)
            ]

        def epilogue_and_store(acc, mi, ni, biases):
            row0 = mi * t.tile_m
            which = ni // tiles_per_out  # the output these columns belong to
            out_col0 = ni * t.tile_n - which * n_out
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for em in range(t.tile_m // t.epi_m):
                for en in range(t.tile_n // t.epi_n):
                    rows = slice(em * t.epi_m, (em + 1) * t.epi_m)
                    cols = slice(en * t.epi_n, (en + 1) * t.epi_n)
                    bias = lax.broadcast_in_dim(biases[en], (t.epi_m, t.epi_n), [1])
                    slot = (em * (t.tile_n // t.epi_n) + en) % 2
                    # The slot's previous store must have left shared memory.
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                    out_smem[wg, slot] = (acc[rows, cols] + bias).astype(dtype)  # XLA rounds here
                    plgpu.commit_smem()
                    dst_rows = pl.ds(row0 + em * t.epi_m, t.epi_m)
                    dst_cols = pl.ds(out_col0 + en * t.epi_n, t.epi_n)
                    for o in range(splits):
                        dst = out_gmem[o].at[dst_rows, dst_cols]
                        store = functools.partial(
                            plgpu.copy_smem_to_gmem, out_smem.at[wg, slot], dst
                        )
                        pl.when(which == o)(store)

        def hand_over():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")

            # The mainloops run strictly in tile order, or warpgroup 1 would wait on a ring slot
            # still holding warpgroup 0's blocks. Warpgroup 0 runs multiply, hand over, epilogue,
            # hand over; warpgroup 1 hand over, multiply, hand over, epilogue. Both loop equally
            # often, so the hand-overs pair up.
            @pl.loop(0, (my_tiles + 1) // 2)
            def _tile(i):
                j = 2 * i + wg
                pl.when(wg == 1)(hand_over)

                def multiply(acc_ref):
                    lag = t.mma_in_flight

                    @pl.loop(0, k_steps)
                    def _k_block(s):
                        slot = slot_of(j, s)
                        plgpu.barrier_wait(x_full.at[slot])
                        plgpu.barrier_wait(w_full.at[slot])
                        plgpu.wgmma(acc_ref, x_smem.at[slot], w_smem.at[slot])
                        plgpu.wgmma_wait(lag)
                        # Free the slot whose WGMMA has finished.
                        done = slot_of(j, s - lag)
                        pl.when(s >= lag)(lambda: plgpu.barrier_arrive(consumed.at[done]))

                    plgpu.wgmma_wait(0)
                    for s in range(k_steps - lag, k_steps):
                        plgpu.barrier_arrive(consumed.at[slot_of(j, s)])
                    return acc_ref[...]

                @pl.when(j < my_tiles)
                def _own_tile():
                    mi, ni = tile_origin(j)
                    # Loaded early, the bias's memory latency hides behind the mainloop.
                    biases = load_bias(ni)
                    acc = pl.run_scoped(multiply, plgpu.ACC((t.tile_m, t.tile_n), jnp.float32))
                    hand_over()
                    epilogue_and_store(acc, mi, ni, biases)
                    pl.when(wg == 0)(hand_over)

                pl.when((j >= my_tiles) & (wg == 1))(hand_over)

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, my_tiles)
            def _tile(j):
                mi, ni = tile_origin(j)

                @pl.loop(0, k_steps)
                def _k_block(s):
                    slot = slot_of(j, s)
                    pl.when(j * k_steps + s >= t.stages)(
                        lambda: plgpu.barrier_wait(consumed.at[slot])
                    )
                    plgpu.copy_gmem_to_smem(
                        x_gmem.at[pl.ds(mi * t.tile_m, t.tile_m), pl.ds(s * t.tile_k, t.tile_k)],
                        x_smem.at[slot],
                        x_full.at[slot],
                    )
                    plgpu.copy_gmem_to_smem(
                        w_gmem.at[pl.ds(s * t.tile_k, t.tile_k), pl.ds(ni * t.tile_n, t.tile_n)],
                        w_smem.at[slot],
                        w_full.at[slot],
                    )

    pl.run_scoped(
        body,
        plgpu.SMEM((t.stages, t.tile_m, t.tile_k), dtype, transforms=smem_transforms(t.tile_k)),
        plgpu.SMEM((t.stages, t.tile_k, t.tile_n), dtype, transforms=smem_transforms(t.tile_k)),
        # Per compute warpgroup: two slots of sub-tiles, so one can fill while the other stores.
        plgpu.SMEM((2, 2, t.epi_m, t.epi_n), dtype, transforms=smem_transforms(t.epi_n)),
        plgpu.Barrier(num_barriers=t.stages),
        plgpu.Barrier(num_barriers=t.stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=t.stages),
        plgpu.Barrier(num_arrivals=2),  # both compute warpgroups meet here
        collective_axes="wg",
    )


def dense_split(
    x: jax.Array, w: jax.Array, b: jax.Array, *, splits: int = 1
) -> tuple[jax.Array, ...]:
    """`x @ w + b` for x [M, K], w [K, N] (both bf16), b [N], as its `splits` column blocks:
    separate [M, N / splits] arrays. Raises ValueError where the shapes fit no tiling
    (see `tiling_for`)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.extend import backend

    m, k = x.shape
    n = w.shape[1]
    if n % splits:
        raise ValueError(f"{n} columns do not split into {splits} outputs")
    t = tiling_for(m, k, n // splits)
    if t is None:
        raise ValueError(f"no dense-split tiling fits M={m}, K={k}, N={n} in {splits} outputs")
    # One CTA per SM, each looping over tiles (1 where the device does not say: tracing on a CPU).
    num_sms = getattr(backend.get_default_device(), "core_count", 1)
    call = plgpu.kernel(
        functools.partial(_kernel, t=t, splits=splits, num_sms=num_sms),
        out_type=tuple(jax.ShapeDtypeStruct((m, n // splits), x.dtype) for _ in range(splits)),
        grid=(num_sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        # Lane semantics: the lowering this kernel was measured and tested with (jax 0.11.2).
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )
    # The bias as XLA's GEMM epilogue sees it: the layer's dtype, added in float32.
    return tuple(call(x, w, b.astype(x.dtype).astype(jnp.float32)))


def reference(x, w, b, *, splits: int = 1) -> tuple[jax.Array, ...]:
    """What `dense_split` computes, in XLA: the same rounding points (the bias in the layer's
    dtype, added in float32, the sum rounded once)."""
    pre = jnp.dot(x, w, preferred_element_type=jnp.float32)
    pre = (pre + b.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)
    return tuple(jnp.split(pre, splits, axis=1))
