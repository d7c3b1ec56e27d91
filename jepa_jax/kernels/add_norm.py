"""A residual add and the LayerNorm after it in one pass: a Pallas (Triton) kernel for CUDA GPUs.

Every pre-norm LayerNorm of a ViT reads the stream just after a branch output was added to it.
XLA runs the add with the row statistics as one fusion and the normalisation as a second, so
the float32 stream is written and then read twice. Here one program holds a block of rows in
registers: it reads the stream and the branch output once and writes the new stream and the
normalised rows (in the dtype the next matmul takes), plus each row's mean and 1/std for the
backward, which XLA computes (`models.layers.add_norm`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _kernel(
    x_ref, h_ref, scale_ref, bias_ref, s_ref, y_ref, mean_ref, rstd_ref, *, eps, rows, block_rows
):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    width = x_ref.shape[1]
    # Triton tensors are power-of-two sized: columns past the width are masked off.
    r = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    c = jnp.arange(_next_power_of_two(width))
    row_ok, col_ok = r < rows, c < width
    at = (r[:, None], c[None, :])
    mask = row_ok[:, None] & col_ok[None, :]
    x = plgpu.load(x_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
    h = plgpu.load(h_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
    s = x + h
    mean = jnp.sum(s, axis=1) / width
    centred = jnp.where(mask, s - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(centred * centred, axis=1) / width + eps)
    scale = plgpu.load(scale_ref.at[c], mask=col_ok, other=0.0).astype(jnp.float32)
    bias = plgpu.load(bias_ref.at[c], mask=col_ok, other=0.0).astype(jnp.float32)
    y = centred * rstd[:, None] * scale[None, :] + bias[None, :]
    plgpu.store(s_ref.at[at], s.astype(s_ref.dtype), mask=mask)
    plgpu.store(y_ref.at[at], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref.at[r], mean, mask=row_ok)
    plgpu.store(rstd_ref.at[r], rstd, mask=row_ok)


@functools.partial(
    jax.jit, static_argnames=("eps", "out_dtype", "block_rows", "warps", "interpret")
)
def add_norm(
    x, h, scale, bias, *, eps: float, out_dtype, block_rows=None, warps=None, interpret=False
):
    """(s, y, mean, rstd) for rows x [M, W] and branch output h [M, W]: s = x + h in x's dtype,
    y = LayerNorm(s) * scale + bias in out_dtype, and each row's mean and 1/std (float32)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows, width = x.shape
    # Two rows per program (8 warps at ViT-H's width): the fastest at the step's shapes on an
    # H200 (BENCHMARKS.md).
    block_rows = block_rows or 2
    warps = warps or (8 if width >= 1024 else 4)
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps, rows=rows, block_rows=block_rows),
        out_shape=(
            jax.ShapeDtypeStruct((rows, width), x.dtype),
            jax.ShapeDtypeStruct((rows, width), out_dtype),
            jax.ShapeDtypeStruct((rows,), jnp.float32),
            jax.ShapeDtypeStruct((rows,), jnp.float32),
        ),
        grid=(pl.cdiv(rows, block_rows),),
        in_specs=[anywhere] * 4,
        out_specs=[anywhere] * 4,
        compiler_params=plgpu.CompilerParams(num_warps=warps),
        interpret=interpret,
        name="add_norm",
    )(x, h, scale, bias)
