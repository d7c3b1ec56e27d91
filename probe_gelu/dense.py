"""A Linear layer with its epilogue fused into the matmul: one Pallas (Mosaic GPU) kernel for
Hopper GPUs.

XLA runs `gelu(x @ w + b)` as a cuBLAS GEMM (bias in its epilogue) that writes the
pre-activation, then a memory-bound pass that reads it back and writes the GELU; the q/k/v
projection's output is likewise copied once more to unstack q, k and v for cuDNN. Here the
epilogue adds the bias, rounds to bf16 (where XLA's GEMM rounds), applies the exact GELU on
request, and writes the result straight to `splits` separate outputs: each activation crosses
device memory once.

Structure: a persistent, warp-specialised GEMM. One warpgroup streams [tile_m, tile_k] and
[tile_k, 2 * tile_n] blocks into shared memory (TMA), two warpgroups each multiply into a
[tile_m, tile_n] float32 accumulator (WGMMA), then run the epilogue on it in sub-tiles and store
them with TMA while the memory warpgroup already loads the next tile.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

_SQRT_HALF = math.sqrt(0.5)


@dataclasses.dataclass(frozen=True)
class Tiling:
    tile_m: int = 128
    tile_n: int = 128  # per compute warpgroup; a CTA tile is [tile_m, 2 * tile_n]
    tile_k: int = 64
    stages: int = 4  # K blocks in flight
    epi_m: int = 64
    epi_n: int = 64
    snake_width: int = 8  # CTA tiles per band of the space-filling tile order
    compute_wgs: int = 2  # warpgroups sharing one CTA tile (each [tile_m, tile_n])
    ctas_per_sm: int = 1  # 2: one CTA's epilogue overlaps the other's matmul
    erf: str = "exact"  # or "as": Abramowitz-Stegun 7.1.26 (abs error 1.5e-7)
    approx_math: bool = False


_SMEM_BYTES = 227 * 1024  # per block on Hopper


def tiling_for(
    m: int, k: int, n_out: int, epilogue: str = "bias", base: Tiling = Tiling()
) -> Tiling | None:
    """The tiling that fits these shapes (each output's columns a whole number of CTA tiles) and
    shared memory, or None where none does (the caller then uses XLA)."""
    values = 2 if epilogue == "gelu+pre" else 1
    for tile_n in (base.tile_n, 64):
        t = dataclasses.replace(base, tile_n=tile_n, epi_n=min(base.epi_n, tile_n))
        cta_n = t.compute_wgs * t.tile_n
        if m % t.tile_m or k % t.tile_k or n_out % cta_n:
            continue
        out_bytes = t.compute_wgs * 2 * values * t.epi_m * t.epi_n * 2
        stage_bytes = (t.tile_m * t.tile_k + t.tile_k * cta_n) * 2
        smem = _SMEM_BYTES // t.ctas_per_sm - 1024
        stages = min(t.stages, (smem - out_bytes - 1024) // stage_bytes)
        if stages >= 2:
            return dataclasses.replace(t, stages=stages)
    return None


def _gelu_f32(h, erf="exact"):
    z = h * _SQRT_HALF
    if erf == "exact":
        return 0.5 * h * (1.0 + lax.erf(z))
    a = jnp.abs(z)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erfc_abs = poly * jnp.exp(-a * a)  # erfc(|z|)
    # Phi(h) = 0.5 * (1 + erf(z)); for z >= 0 that is 1 - erfc/2, else erfc/2.
    half = 0.5 * erfc_abs
    cdf = jnp.where(z >= 0, 1.0 - half, half)
    return h * cdf


def _kernel(x_gmem, w_gmem, b_gmem, *out_gmem, t: Tiling, splits: int, epilogue: str):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x_gmem.shape
    n = w_gmem.shape[1]
    n_out = n // splits
    dtype = x_gmem.dtype
    cta_n = t.compute_wgs * t.tile_n
    m_tiles, n_tiles, k_steps = m // t.tile_m, n // cta_n, k // t.tile_k
    tiles_per_out = n_out // cta_n
    keep_pre = epilogue == "gelu+pre"  # also write the pre-activation (for the backward)
    values_per_tile = 2 if keep_pre else 1

    def smem_transforms(cols, dt):
        swizzle = plgpu.find_swizzle(cols * jnp.dtype(dt).itemsize * 8)
        return (
            plgpu.TilingTransform((8, swizzle // jnp.dtype(dt).itemsize)),
            plgpu.SwizzleTransform(swizzle),
        )

    in_transforms = smem_transforms(t.tile_k, dtype)

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec(
                    (t.tile_m, t.tile_k),
                    lambda s: (0, s),
                    transforms=in_transforms,
                    memory_space=plgpu.SMEM,
                ),
                plgpu.BlockSpec(
                    (t.tile_k, cta_n),
                    lambda s: (s, 0),
                    transforms=in_transforms,
                    memory_space=plgpu.SMEM,
                ),
            ],
            wg_axis="wg",
            num_compute_wgs=t.compute_wgs,
            max_concurrent_steps=t.stages,
            compute_context=compute_context,
        )

    def unused(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(unused, unused).get_allocations(x_gmem, w_gmem),
        # Per compute warpgroup: two slots of sub-tiles, so one can fill while the other stores.
        out_smem=plgpu.SMEM(
            (t.compute_wgs, 2, values_per_tile, t.epi_m, t.epi_n),
            dtype,
            transforms=smem_transforms(t.epi_n, dtype),
        ),
        collective_axes="wg",
    )
    def _scope(allocations, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _tile_loop(info):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), 1, t.snake_width)
            row0 = mi * t.tile_m
            col0 = ni * cta_n + wg * t.tile_n  # this warpgroup's first column of w
            which = ni // tiles_per_out  # the output these columns belong to
            out_col0 = col0 - which * n_out

            def epilogue_context(run_pipeline):
                @functools.partial(pl.run_scoped, acc=plgpu.ACC((t.tile_m, t.tile_n), jnp.float32))
                def _acc_scope(acc):
                    run_pipeline(acc)
                    acc_value = acc[...]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for em in range(t.tile_m // t.epi_m):
                        for en in range(t.tile_n // t.epi_n):
                            rows = slice(em * t.epi_m, (em + 1) * t.epi_m)
                            cols = slice(en * t.epi_n, (en + 1) * t.epi_n)
                            bias = plgpu.load(
                                b_gmem.at[pl.ds(col0 + en * t.epi_n, t.epi_n)],
                                (),
                                layout=plgpu.Layout.WGMMA.reduce(0),
                                optimized=False,
                            )
                            pre = acc_value[rows, cols] + lax.broadcast_in_dim(
                                bias, (t.epi_m, t.epi_n), [1]
                            )
                            pre = pre.astype(dtype)  # where XLA's GEMM rounds
                            values = [pre]
                            if epilogue != "bias":
                                act = _gelu_f32(pre.astype(jnp.float32), t.erf).astype(dtype)
                                values = [act, pre] if keep_pre else [act]
                            slot = (em * (t.tile_n // t.epi_n) + en) % 2
                            # The slot's previous stores must have left shared memory.
                            plgpu.wait_smem_to_gmem(values_per_tile, wait_read_only=True)
                            for v, value in enumerate(values):
                                out_smem[wg, slot, v] = value
                            plgpu.commit_smem()
                            dst_rows = pl.ds(row0 + em * t.epi_m, t.epi_m)
                            dst_cols = pl.ds(out_col0 + en * t.epi_n, t.epi_n)
                            for v in range(values_per_tile):
                                for o in range(splits):
                                    dst = out_gmem[v * splits + o].at[dst_rows, dst_cols]
                                    store = functools.partial(
                                        plgpu.copy_smem_to_gmem, out_smem.at[wg, slot, v], dst
                                    )
                                    pl.when(which == o)(store)

            def mma(_, x_smem, w_smem, acc):
                plgpu.wgmma(acc, x_smem, w_smem.at[:, pl.ds(wg * t.tile_n, t.tile_n)])
                plgpu.wgmma_wait(0)
                return acc

            pipeline(mma, epilogue_context)(
                x_gmem.at[pl.ds(row0, t.tile_m), :],
                w_gmem.at[:, pl.ds(ni * cta_n, cta_n)],
                allocations=allocations,
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def fused_dense(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    *,
    epilogue: str = "bias",
    splits: int = 1,
    tiling: Tiling | None = None,
) -> tuple[jax.Array, ...]:
    """`x @ w + b` for x [M, K], w [K, N] (both bf16), b [N], with the epilogue fused:

    - "bias": the `splits` column blocks of the result, as separate [M, N / splits] arrays;
    - "gelu": their exact GELUs;
    - "gelu+pre": the GELUs, then the pre-activations.

    Raises ValueError where the shapes fit no tiling (see `tiling_for`).
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.extend import backend

    m, k = x.shape
    n = w.shape[1]
    if n % splits:
        raise ValueError(f"{n} columns do not split into {splits} outputs")
    t = tiling_for(m, k, n // splits, epilogue, tiling or Tiling())
    if t is None:
        raise ValueError(f"no fused-dense tiling fits M={m}, K={k}, N={n} in {splits} outputs")
    outputs = splits * (2 if epilogue == "gelu+pre" else 1)
    call = plgpu.kernel(
        functools.partial(_kernel, t=t, splits=splits, epilogue=epilogue),
        out_type=tuple(jax.ShapeDtypeStruct((m, n // splits), x.dtype) for _ in range(outputs)),
        # One CTA per SM, each looping over tiles (1 where the device does not say: tracing on
        # a CPU).
        grid=(t.ctas_per_sm * getattr(backend.get_default_device(), "core_count", 1),),
        grid_names=("sm",),
        num_threads=t.compute_wgs + 1,
        thread_name="wg",
        # Lane semantics: the warpgroup lowering has no layout rule for erf (jax 0.11.2).
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane, approx_math=t.approx_math
        ),
    )
    # The bias as XLA's GEMM epilogue sees it: the layer's dtype, added in float32.
    return tuple(call(x, w, b.astype(x.dtype).astype(jnp.float32)))


def reference(x, w, b, *, epilogue: str = "bias", splits: int = 1) -> tuple[jax.Array, ...]:
    """What `fused_dense` computes, in XLA: the same rounding points (the bias in the layer's
    dtype, added in float32, the sum rounded once, the GELU in float32 on the rounded value)."""
    pre = jnp.dot(x, w, preferred_element_type=jnp.float32)
    pre = (pre + b.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)
    if epilogue == "bias":
        return tuple(jnp.split(pre, splits, axis=1))
    act = _gelu_f32(pre.astype(jnp.float32)).astype(x.dtype)
    return (act, pre) if epilogue == "gelu+pre" else (act,)
