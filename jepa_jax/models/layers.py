"""Layer pieces the encoder and predictor share: the exact GELU, and the two Linear layers whose
epilogue can run inside the matmul (`kernels.dense`, Hopper): fc1 + GELU, and q/k/v.

With `fused=False`, or for shapes the kernel does not tile, they are the plain Linear followed
by the same epilogue in XLA; both compute the same function (tests/test_kernels.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jepa_jax.kernels.dense import fused_dense, tiling_for


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as the release trained, computed in float32 and returned in x's dtype.

    It has its own backward so that only `x` is kept for it: autodiff of `jax.nn.gelu` kept four
    activation-sized arrays per call and recomputed erfc (H/14 step 6% faster, 12% less memory
    without them; BENCHMARKS.md).
    """
    xf = x.astype(jnp.float32)
    return (xf * _normal_cdf(xf)).astype(x.dtype)


def _normal_cdf(xf: jax.Array) -> jax.Array:
    return 0.5 * (1 + jax.lax.erf(xf * math.sqrt(0.5)))


def _gelu_forward(x):
    return gelu(x), x


def _gelu_backward(x, grad):
    xf = x.astype(jnp.float32)
    normal_pdf = jnp.exp(-0.5 * xf * xf) / math.sqrt(2 * math.pi)
    return ((grad.astype(jnp.float32) * (_normal_cdf(xf) + xf * normal_pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_forward, _gelu_backward)


def linear_gelu(linear: nnx.Linear, x: jax.Array, fused: bool) -> jax.Array:
    """gelu(linear(x))."""
    args = _kernel_args(linear, x, 1, "gelu+pre") if fused else None
    if args is None:
        return gelu(linear(x))
    (act,) = _dense(*args, "gelu", 1)
    return act.reshape(*x.shape[:-1], -1)


def linear_split(linear: nnx.Linear, x: jax.Array, splits: int, fused: bool) -> list[jax.Array]:
    """linear(x) cut into `splits` equal column blocks (q, k, v)."""
    args = _kernel_args(linear, x, splits, "bias") if fused else None
    if args is None:
        return jnp.split(linear(x), splits, axis=-1)
    return [out.reshape(*x.shape[:-1], -1) for out in _dense(*args, "bias", splits)]


def _kernel_args(linear: nnx.Linear, x: jax.Array, splits: int, epilogue: str):
    """(x [M, K], kernel, bias) in the layer's dtype, as the kernel takes them; None where the
    kernel has no tiling for these shapes."""
    rows = math.prod(x.shape[:-1])
    if tiling_for(rows, x.shape[-1], linear.out_features // splits, epilogue) is None:
        return None
    dtype = linear.dtype
    return (
        x.reshape(rows, x.shape[-1]).astype(dtype),
        linear.kernel[...].astype(dtype),
        linear.bias[...],
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dense(x, w, b, epilogue: str, splits: int) -> tuple[jax.Array, ...]:
    return fused_dense(x, w, b, epilogue=epilogue, splits=splits)


def _dense_forward(x, w, b, epilogue, splits):
    if epilogue == "gelu":  # the backward needs the pre-activation: the kernel writes both
        act, pre = fused_dense(x, w, b, epilogue="gelu+pre")
        return (act,), (x, w, b, pre)
    return fused_dense(x, w, b, epilogue=epilogue, splits=splits), (x, w, b, None)


def _dense_backward(epilogue, splits, residuals, grads):
    """The Linear's backward in XLA, as autodiff of the unfused layer computes it."""
    x, w, b, pre = residuals
    g = jnp.concatenate(grads, axis=-1) if splits > 1 else grads[0]
    if epilogue == "gelu":
        (g,) = _gelu_backward(pre, g)
    bias_grad = jnp.sum(g.astype(jnp.float32), axis=0).astype(b.dtype)
    return g @ w.T, x.T @ g, bias_grad


_dense.defvjp(_dense_forward, _dense_backward)
