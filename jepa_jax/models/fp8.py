"""FP8 matmuls for the EMA target encoder (`config.model.fp8="target"`, off by default).

Each block matmul of the target encoder multiplies e4m3 operands, with one scale per tensor.
The operands are quantised and dequantised around an ordinary dot (q-dq): XLA's GEMM rewriter
turns that pattern into one FP8 tensor-core GEMM on GPUs that have them (compute capability
8.9 and later: Ada, Hopper and newer), and elsewhere runs it as written: the same e4m3 rounding
on every backend. Parameters, optimizer state and checkpoints do not change: FP8 exists only
inside the matmul.

An activation's scale comes from a bound on it derived from the parameters (a LayerNorm's
normalised row has L2 norm at most sqrt(width), and Cauchy-Schwarz carries that through a
Linear), not from its maximum: no pass over the activation runs first, and the rounding fuses
into the kernel that produces it. e4m3 keeps 3 significant bits across 15 binades, so a loose
bound costs precision only in values far below the largest (ViT-Ti at init: 2.2% error against
float32, as with each tensor's own maximum). Weights use their own maximum (small tensors).

Why the target encoder alone: it runs forward only. cuBLAS's FP8 GEMM takes both operands with
the contracted axis minor, so a weight gradient needs transposed FP8 copies of its activation
and output gradient, and a gradient has no bound to scale by; those passes cost what the faster
GEMMs saved in the trained networks. On an H200 the bounds ran ViT-H/14's step 10-11% faster and
ViT-B/16's 2% (each tensor's own maximum: +5.2%, -3.0%; BENCHMARKS.md, "FP8 in the target
encoder" and the tenth session's table).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

SETTINGS = ("off", "target")
E4M3 = jnp.float8_e4m3fn  # 3 mantissa bits, largest value 448
E4M3_MAX = float(jnp.finfo(E4M3).max)
# |gelu(h)| <= max(|h|, GELU_MIN): the negative lobe bottoms out at -0.16997 (exact) and
# -0.17004 (the tanh approximation, `config.model.gelu=tanh`).
GELU_MIN = 0.1701


def setting(model_config) -> str:
    """`config.model.fp8`; configs saved before the field ran without FP8 (`off`)."""
    return model_config.get("fp8", "off")


def compiler_options(model_config) -> dict:
    """XLA options for a step with this FP8 setting. XLA merges dots that share an operand into
    one where they are small; q, k and v, quantised each with its own scale, would then run as
    one bf16 GEMM (at ViT-B/16, 128 images: q and k did). So FP8 turns the merger off. The
    default step compiles to the same kernels with it off (BENCHMARKS.md, nineteenth session)."""
    return {"xla_gpu_dot_merger_threshold_mb": 0} if setting(model_config) == "target" else {}


FP8_CAPABILITY = (8, 9)  # NVIDIA Ada and later have FP8 tensor cores; XLA needs them for FP8 GEMMs


def describe(capability: tuple[int, int] | None) -> str:
    """The startup line for `fp8=target` on a device of this CUDA compute capability (None: no
    CUDA GPU): FP8 GEMMs, or the same rounding emulated, which only costs time."""
    if capability is not None and capability >= FP8_CAPABILITY:
        return "FP8: the target encoder's block matmuls as FP8 GEMMs (config.model.fp8=target)"
    device = "this GPU" if capability else "this device"
    needed = ".".join(map(str, FP8_CAPABILITY))
    return (
        "FP8: the target encoder's block matmuls rounded to e4m3, but emulated: "
        f"{device} has no FP8 tensor cores (NVIDIA compute capability {needed} or later), so "
        "steps are slower than with config.model.fp8=off"
    )


def quantize_dequantize(x: jax.Array, bound: jax.Array | None = None) -> jax.Array:
    """x rounded to e4m3 under the scale that maps `bound` (>= max|x|; by default max|x|
    itself) to e4m3's largest value, back in x's dtype. Clipped: a bound a rounding short
    saturates instead of overflowing to NaN."""
    if bound is None:
        bound = jnp.max(jnp.abs(x))
    # Within x's dtype, so that the scale survives the cast back: at least its smallest normal
    # (zeros stay 0), at most what keeps 448 x scale finite (float16; larger values saturate).
    tiny, largest = float(jnp.finfo(x.dtype).tiny), float(jnp.finfo(x.dtype).max) / E4M3_MAX
    scale = jnp.clip(jnp.asarray(bound, jnp.float32) / E4M3_MAX, tiny, largest)
    # Divide by the scale that the cast back multiplies by, so no rounding of the scale to x's
    # dtype (bf16: up to 0.4%) biases the whole tensor.
    return _round(x, scale.astype(x.dtype))


@jax.custom_vjp
def _round(x: jax.Array, scale: jax.Array) -> jax.Array:
    # On CUDA, divided and clamped in x's dtype: the form XLA folds into an FP8 GEMM that
    # produces x (fc1 + bias + tanh GELU written straight to e4m3, no pass for fc2's input).
    return (
        jax.lax.platform_dependent(
            x, scale, cuda=_round_in_dtype, default=_round_in_float32
        ).astype(x.dtype)
        * scale
    )


def _round_in_float32(x, scale):
    return jnp.clip(x.astype(jnp.float32) / scale.astype(jnp.float32), -E4M3_MAX, E4M3_MAX).astype(
        E4M3
    )


def _round_in_dtype(x, scale):
    low, high = (jnp.full(x.shape, limit, x.dtype) for limit in (-E4M3_MAX, E4M3_MAX))
    return jax.lax.clamp(low, x / scale, high).astype(E4M3)


# A gradient passes the rounding straight through, and none reaches the scale (it is not
# trained). Autodiff would instead cast the gradient itself to e4m3, unscaled: small gradients
# would flush to zero.
_round.defvjp(lambda x, scale: (_round(x, scale), None), lambda _, g: (g, None))


def dense(
    layer: nnx.Linear, x: jax.Array, bound: jax.Array, columns: slice = slice(None)
) -> jax.Array:
    """`layer(x)[..., columns]` with e4m3 operands: x scaled by `bound` (>= max|x|), the
    kernel's columns by their max."""
    dtype = layer.dtype
    kernel = quantize_dequantize(layer.kernel[...][:, columns].astype(dtype))
    x = quantize_dequantize(x.astype(dtype), bound)
    y = jax.lax.dot_general(
        x, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=dtype
    )
    return y + layer.bias[...][columns].astype(dtype)


def norm_bounds(norm: nnx.LayerNorm, width: int) -> tuple[jax.Array, jax.Array]:
    """(max |value|, max L2 norm) of a LayerNorm's output rows, from its parameters: the
    normalised row has L2 norm at most sqrt(width), so no entry exceeds that either."""
    gamma, beta = norm.scale[...], norm.bias[...]
    spread = math.sqrt(width) * jnp.max(jnp.abs(gamma))
    return spread + jnp.max(jnp.abs(beta)), spread + jnp.linalg.norm(beta)


def output_bound(kernel: jax.Array, bias: jax.Array, input_l2: jax.Array) -> jax.Array:
    """max |x W + b| over rows x of L2 norm at most `input_l2` (Cauchy-Schwarz per column)."""
    columns = jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)), axis=0))
    return input_l2 * jnp.max(columns) + jnp.max(jnp.abs(bias))


def block_forward(block, x: jax.Array, kv_lengths, activation: Callable) -> jax.Array:
    """`models.vit.Block`'s forward with its four matmuls in FP8, each activation scaled by its
    bound: the norms' for q/k/v and fc1; v's for the attention output (a weighted mean of v
    rows); fc1's output's for the GELU's."""
    attn, d = block.attn, x.shape[-1]
    norm_max, norm_l2 = norm_bounds(block.norm1, d)
    # q, k and v as three GEMMs, each writing its own array: one GEMM's output split three
    # ways is a copy pass (H/14: 16 GB a step, `bench compiled`).
    normed = block.norm1(x)
    q, k, v = (dense(attn.qkv, normed, norm_max, slice(i * d, (i + 1) * d)) for i in range(3))
    v_max = output_bound(attn.qkv.kernel[...][:, 2 * d :], attn.qkv.bias[...][2 * d :], norm_l2)
    x = x + dense(attn.proj, attn.attend(q, k, v, kv_lengths), v_max)
    norm_max, norm_l2 = norm_bounds(block.norm2, d)
    # As rows, so that no bitcast sits between fc1's GEMM and the rounding XLA folds into it.
    h = dense(block.fc1, block.norm2(x).reshape(-1, d), norm_max)
    h_max = output_bound(block.fc1.kernel[...], block.fc1.bias[...], norm_l2)
    return x + dense(block.fc2, activation(h), jnp.maximum(h_max, GELU_MIN)).reshape(x.shape)


def with_fp8_matmuls(encoder: nnx.Module) -> nnx.Module:
    """A copy of `encoder` (a `models.VisionTransformer`) whose blocks multiply in FP8, with the
    same parameters. The patch embedding stays bf16: a small matmul on pixels."""
    copy = nnx.clone(encoder)
    copy.blocks.layers.fp8_matmuls = True
    return copy
