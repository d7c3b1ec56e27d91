"""FP8 matmuls for the transformer blocks (`config.model.fp8`): e4m3 inputs forward, e5m2
gradients backward, each tensor scaled by its own current absolute maximum.

Each operand is quantised and dequantised around an ordinary `dot_general` (q-dq); XLA's GEMM
rewriter turns that pattern into one FP8 tensor-core GEMM on Hopper and newer GPUs, and runs it as
written (upcast, then a bf16 matmul) elsewhere, so the numerics are the same on any backend.
Parameters, optimizer state and checkpoints are unchanged: FP8 exists only inside the matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FORWARD = jnp.float8_e4m3fn  # 3 mantissa bits, max 448: activations and weights
BACKWARD = jnp.float8_e5m2  # 2 mantissa bits, max 57344: the range gradients need


def _quantize_dequantize(x: jax.Array, f8) -> jax.Array:
    """x rounded to `f8` under a per-tensor scale that maps max|x| to f8's largest value."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    scale = jnp.maximum(amax, jnp.finfo(jnp.float32).tiny) / float(jnp.finfo(f8).max)
    q = (x.astype(jnp.float32) / scale).astype(f8)
    return q.astype(x.dtype) * scale.astype(x.dtype)


@jax.custom_vjp
def _forward_fp8(x: jax.Array) -> jax.Array:
    """e4m3 in the forward pass; the gradient passes straight through (it is quantised at the
    matmul's output instead, where it enters both backward GEMMs)."""
    return _quantize_dequantize(x, FORWARD)


_forward_fp8.defvjp(lambda x: (_forward_fp8(x), None), lambda _, g: (g,))


@jax.custom_vjp
def _backward_fp8(y: jax.Array) -> jax.Array:
    """The identity forward; its incoming gradient rounded to e5m2 on the way back."""
    return y


_backward_fp8.defvjp(lambda y: (y, None), lambda _, g: (_quantize_dequantize(g, BACKWARD),))


def dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
    """`jax.lax.dot_general` with FP8 operands and FP8 gradients (the `dot_general` argument of
    `nnx.Linear`, which also passes `out_sharding`); the output keeps the inputs' dtype."""
    kwargs.setdefault("preferred_element_type", lhs.dtype)
    out = jax.lax.dot_general(
        _forward_fp8(lhs), _forward_fp8(rhs), dimension_numbers, precision=precision, **kwargs
    )
    return _backward_fp8(out)
