"""Layers that can run inside a kernel, each with its plain XLA form:

- the q/k/v projection (`kernels.dense`, Hopper): the matmul writes q, k and v apart, so no
  copy unstacks them for the attention;
- a residual add and the LayerNorm after it (`kernels.add_norm`): one pass over the stream.

With `fused=False`, or for shapes the kernel does not take, each is the plain layer in XLA;
both forms compute the same function (tests/test_kernels.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jepa_jax.kernels import add_norm as add_norm_kernel
from jepa_jax.kernels.dense import dense_split, tiling_for


def linear_split(linear: nnx.Linear, x: jax.Array, splits: int, fused: bool) -> list[jax.Array]:
    """linear(x) cut into `splits` equal column blocks (q, k, v)."""
    rows = math.prod(x.shape[:-1])
    if not fused or tiling_for(rows, x.shape[-1], linear.out_features // splits) is None:
        return jnp.split(linear(x), splits, axis=-1)
    dtype = linear.dtype
    outs = _dense_split(
        x.reshape(rows, x.shape[-1]).astype(dtype),
        linear.kernel[...].astype(dtype),
        linear.bias[...],
        splits,
    )
    return [out.reshape(*x.shape[:-1], -1) for out in outs]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dense_split(x, w, b, splits: int) -> tuple[jax.Array, ...]:
    return dense_split(x, w, b, splits=splits)


def _dense_split_forward(x, w, b, splits):
    return dense_split(x, w, b, splits=splits), (x, w, b)


def _dense_split_backward(splits, residuals, grads):
    """The Linear's backward in XLA, as autodiff of the unfused layer computes it."""
    x, w, b = residuals
    g = jnp.concatenate(grads, axis=-1)
    bias_grad = jnp.sum(g.astype(jnp.float32), axis=0).astype(b.dtype)
    return g @ w.T, x.T @ g, bias_grad


_dense_split.defvjp(_dense_split_forward, _dense_split_backward)


def add_norm(
    norm: nnx.LayerNorm, x: jax.Array, h: jax.Array, out_dtype, fused: bool
) -> tuple[jax.Array, jax.Array]:
    """(s, norm(s) in out_dtype) for the stream s = x + h: the residual add, then the pre-norm
    LayerNorm of the next layer. The kernel takes a float32 stream only."""
    if not fused or x.dtype != jnp.float32:
        s = x + h
        return s, norm(s).astype(out_dtype)
    width = x.shape[-1]
    s, y = _add_norm(
        x.reshape(-1, width),
        h.reshape(-1, width),
        norm.scale[...],
        norm.bias[...],
        norm.epsilon,
        jnp.dtype(out_dtype),
    )
    return s.reshape(x.shape), y.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _add_norm(x, h, scale, bias, eps, out_dtype):
    return _add_norm_forward(x, h, scale, bias, eps, out_dtype)[0]


def _add_norm_forward(x, h, scale, bias, eps, out_dtype):
    s, y, mean, rstd = add_norm_kernel.add_norm(x, h, scale, bias, eps=eps, out_dtype=out_dtype)
    return (s, y), (s, mean, rstd, scale, jnp.zeros((0,), h.dtype))


def _add_norm_backward(eps, out_dtype, residuals, grads):
    """LayerNorm's backward in XLA, from the saved stream and row statistics."""
    s, mean, rstd, scale, h_dtype = residuals
    ds, dy = grads
    xhat = (s - mean[:, None]) * rstd[:, None]
    dy = dy.astype(jnp.float32)
    g = dy * scale
    dxhat = g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True)
    dx = ds + rstd[:, None] * dxhat
    dscale = jnp.sum(dy * xhat, axis=0).astype(scale.dtype)
    return dx, dx.astype(h_dtype.dtype), dscale, jnp.sum(dy, axis=0).astype(scale.dtype)


_add_norm.defvjp(_add_norm_forward, _add_norm_backward)
