"""The networks' Linear layer, and the q/k/v projection.

- `Linear`: nnx.Linear whose weight and bias gradients, where a mesh splits the batch, are
  summed over the devices in float32, as the release's data parallel sums its float32
  gradients. Left to XLA, each device's partial sum kept the bf16 GEMM's dtype and the devices
  added them in bf16, rounding at every step of the ring.
- `linear_split`: the q/k/v projection, which can run inside the `kernels.dense` kernel
  (Hopper): the matmul writes q, k and v apart, so no copy unstacks them for the attention.
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


class Linear(nnx.Linear):
    """nnx.Linear (default precision and dot_general, as the networks build it); on a mesh that
    splits the batch, its gradients are summed in float32."""

    def __call__(self, x: jax.Array) -> jax.Array:
        if sharding.batch_shards() == 1:
            return super().__call__(x)
        bias = self.bias[...] if self.bias is not None else None
        x, w, b = self.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        return _affine(x, w, b)


@jax.custom_vjp
def _affine(x, w, b):
    y = jnp.dot(x, w)
    return y if b is None else y + b


def _affine_forward(x, w, b):
    return _affine(x, w, b), (x, w, b)


def _affine_backward(residuals, g):
    x, w, b = residuals
    g_rows = g.reshape(-1, g.shape[-1])
    w_grad = _summed_weight_grad(x.reshape(-1, x.shape[-1]), g_rows, w.dtype)
    b_grad = None if b is None else _column_sums(g_rows).astype(b.dtype)
    return jnp.dot(g, w.T), w_grad, b_grad


_affine.defvjp(_affine_forward, _affine_backward)


def _summed_weight_grad(rows: jax.Array, g: jax.Array, dtype) -> jax.Array:
    """rows^T g over rows split across devices: each device's partial sum comes out of the GEMM
    in float32, so the devices add float32; the total is rounded to `dtype` once."""
    w_grad = jax.lax.dot_general(
        rows, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return w_grad.astype(dtype)


def _column_sums(g: jax.Array) -> jax.Array:
    """g's sums over its rows, in float32 (on a mesh, each device's partial sums too)."""
    return jnp.sum(g.astype(jnp.float32), axis=0)


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


def _run_dense_split(x, w, b, splits: int) -> tuple[jax.Array, ...]:
    """The kernel, on each device's rows where a mesh splits the batch."""
    kernel = functools.partial(dense_split, splits=splits)
    return sharding.on_each_device(kernel, x, w, b, whole=(1, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dense_split(x, w, b, splits: int) -> tuple[jax.Array, ...]:
    return _run_dense_split(x, w, b, splits)


def _dense_split_forward(x, w, b, splits):
    return _run_dense_split(x, w, b, splits), (x, w, b)


def _dense_split_backward(splits, residuals, grads):
    """The Linear's backward in XLA, as autodiff of the unfused layer computes it; on a mesh,
    its weight gradient summed over the devices in float32 (`Linear`)."""
    x, w, b = residuals
    g = jnp.concatenate(grads, axis=-1)
    w_grad = _summed_weight_grad(x, g, w.dtype) if sharding.batch_shards() > 1 else x.T @ g
    return g @ w.T, w_grad, _column_sums(g).astype(b.dtype)


_dense_split.defvjp(_dense_split_forward, _dense_split_backward)
