"""The q/k/v projection, which can run inside the `kernels.dense` kernel (Hopper): the matmul
writes q, k and v apart, so no copy unstacks them for the attention.

With `fused=False`, or for shapes the kernel does not tile, it is the plain Linear, split in
XLA; both compute the same function (tests/test_kernels.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jepa_jax import sharding
from jepa_jax.kernels.dense import dense_split, tiling_for


def linear_split(linear: nnx.Linear, x: jax.Array, splits: int, fused: bool) -> list[jax.Array]:
    """linear(x) cut into `splits` equal column blocks (q, k, v)."""
    rows = math.prod(x.shape[:-1])
    local = sharding.local_shape((rows,))  # each device's rows, where a mesh splits the batch
    width = linear.out_features // splits
    if not fused or local is None or tiling_for(*local, x.shape[-1], width) is None:
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
    kernel = functools.partial(dense_split, splits=splits)
    return sharding.on_each_device(kernel, x, w, b, whole=(1, 2))


def _dense_split_forward(x, w, b, splits):
    return _dense_split(x, w, b, splits), (x, w, b)


def _dense_split_backward(splits, residuals, grads):
    """The Linear's backward in XLA, as autodiff of the unfused layer computes it."""
    x, w, b = residuals
    g = jnp.concatenate(grads, axis=-1)
    bias_grad = jnp.sum(g.astype(jnp.float32), axis=0).astype(b.dtype)
    return g @ w.T, x.T @ g, bias_grad


_dense_split.defvjp(_dense_split_forward, _dense_split_backward)
