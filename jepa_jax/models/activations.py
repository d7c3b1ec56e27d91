"""The MLPs' GELUs, and which one a config runs.

- `gelu`: the exact (erf) GELU the release trained with, in float32, with its own backward.
- `gelu_in_kernel`: the same, its forward in `kernels.gelu`'s Pallas kernel (CUDA GPUs).
- `gelu_tanh`: the tanh approximation (`config.model.gelu=tanh`), which cuBLAS computes inside
  fc1's GEMM on CUDA GPUs: faster, not the release's formula.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jepa_jax import kernels, sharding
from jepa_jax.kernels import gelu as pallas_gelu


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


@jax.custom_vjp
def gelu_in_kernel(x: jax.Array) -> jax.Array:
    """`gelu` with its forward in `kernels.gelu`'s Pallas kernel where x's shape tiles (a CUDA
    GPU only); the same backward."""
    local = sharding.local_shape(x.shape)
    if local is None or not pallas_gelu.fits(local):
        return gelu(x)
    return sharding.on_each_device(pallas_gelu.gelu, x)


def _gelu_in_kernel_forward(x):
    return gelu_in_kernel(x), x


gelu_in_kernel.defvjp(_gelu_in_kernel_forward, _gelu_backward)


def gelu_formula(model_config) -> str:
    """`config.model.gelu`; configs saved before the field ran the exact GELU."""
    return model_config.get("gelu", "exact")


_TANH_SCALE = math.sqrt(2 / math.pi)
_TANH_CUBIC = 0.044715


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU's tanh approximation (`config.model.gelu=tanh`: faster, not the release's formula).

    On CUDA it is written in x's dtype, the form XLA's GEMM rewriter folds into the cuBLAS GEMM
    that computes x (fc1 + bias + GELU as one kernel, evaluated in float32 before the output is
    rounded: closer to float32's exact GELU than the autocast path, which rounds fc1's output
    first; BENCHMARKS.md). Where XLA does not fold it (no cuBLAS GEMM before it, e.g. with
    Triton GEMMs turned on), that form runs in bf16 arithmetic: within 1.5 bf16 steps for x >= 0,
    but 1 + tanh cancels for x < 0 (up to 3e-3 off). In the train step every one folds (a GPU
    test checks the tiny preset's step). Elsewhere nothing fuses it, so it is computed in float32.
    """
    return jax.lax.platform_dependent(
        x,
        cuda=functools.partial(jax.nn.gelu, approximate=True),
        default=_gelu_tanh_float32,
    )


def _gelu_tanh_float32(x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * _tanh_cdf(xf)).astype(x.dtype)


def _tanh_cdf(xf: jax.Array) -> jax.Array:
    """(1 + tanh z) / 2 as sigmoid(2z), which does not cancel where tanh z nears -1."""
    return jax.nn.sigmoid(2 * _TANH_SCALE * (xf + _TANH_CUBIC * xf**3))


def _gelu_tanh_forward(x):
    return gelu_tanh(x), x


def _gelu_tanh_backward(x, grad):
    # Clipped where the slope is 1, or under 1e-35, in float32: x^3 would overflow (0 * inf).
    xf = jnp.clip(x.astype(jnp.float32), -10, 10)
    cdf = _tanh_cdf(xf)
    slope = cdf + xf * 2 * cdf * (1 - cdf) * _TANH_SCALE * (1 + 3 * _TANH_CUBIC * xf * xf)
    return ((grad.astype(jnp.float32) * slope).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_tanh_forward, _gelu_tanh_backward)


def without_kernel(activation):
    """The activation without the Pallas kernel (the FP8 blocks fuse XLA's GELU themselves)."""
    return gelu if activation is gelu_in_kernel else activation


def for_mlp(gelu_kernel: kernels.GeluKernel):
    """The GELU every MLP calls: the tanh approximation, or the exact one in or out of the
    Pallas kernel."""
    if gelu_kernel.formula == "tanh":
        return gelu_tanh
    return gelu_in_kernel if gelu_kernel.on else gelu
