"""FP8 matmuls for the EMA target encoder (`config.model.fp8="target"`, off by default).

Each block Linear of the target encoder multiplies e4m3 operands, each tensor scaled by its own
current absolute maximum. The operands are quantised and dequantised around an ordinary dot
(q-dq): XLA's GEMM rewriter turns that pattern into one FP8 tensor-core GEMM on Hopper and
later GPUs, and elsewhere runs it as written: the same e4m3 rounding on every backend.
Parameters, optimizer state and checkpoints do not change: FP8 exists only inside the matmul.

Why the target encoder alone: it runs forward only. cuBLAS's FP8 GEMM takes both operands with
the contracted axis minor, so a weight gradient needs transposed FP8 copies of its activation
and output gradient; those copies and the scales' maxima cost what the faster GEMMs saved in the
trained networks (on an H200, ViT-H/14's context encoder forward + backward ran level, its
target forward 1.12x faster). Whole steps: ViT-H/14 3.9% faster, ViT-B/16 2% slower, where the
768-wide GEMMs gain less than the scaling passes cost (BENCHMARKS.md, "FP8 in the target
encoder").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jepa_jax.models.vit import Attention, VisionTransformer

SETTINGS = ("off", "target")
E4M3 = jnp.float8_e4m3fn  # 3 mantissa bits, largest value 448


def quantize_dequantize(x: jax.Array) -> jax.Array:
    """x rounded to e4m3 under one scale that maps max|x| to e4m3's largest value, back in x's
    dtype."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    # At least x's dtype's smallest normal: the scale must survive the cast back (zeros stay 0).
    scale = jnp.maximum(amax / float(jnp.finfo(E4M3).max), float(jnp.finfo(x.dtype).tiny))
    quantized = (x.astype(jnp.float32) / scale).astype(E4M3)
    return quantized.astype(x.dtype) * scale.astype(x.dtype)


def dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs) -> jax.Array:
    """`jax.lax.dot_general` on e4m3-rounded operands (the `dot_general` of `nnx.Linear`, which
    also passes `out_sharding`); the output keeps the inputs' dtype."""
    kwargs.setdefault("preferred_element_type", lhs.dtype)
    return jax.lax.dot_general(
        quantize_dequantize(lhs),
        quantize_dequantize(rhs),
        dimension_numbers,
        precision=precision,
        **kwargs,
    )


def with_fp8_matmuls(encoder: VisionTransformer) -> VisionTransformer:
    """A copy of `encoder` whose transformer blocks multiply in FP8, the same parameters.

    Its q/k/v projection runs in XLA rather than the fused bf16 kernel, so that it is an FP8
    GEMM too (2 ms less of ViT-H/14's target forward on an H200). The patch embedding stays
    bf16: it is a small matmul on pixels.
    """
    copy = nnx.clone(encoder)
    for _, module in nnx.iter_graph(copy.blocks):
        if isinstance(module, nnx.Linear):
            module.dot_general = dot_general
        elif isinstance(module, Attention):
            module.fused_qkv = False
    return copy
