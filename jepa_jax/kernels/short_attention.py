"""Attention's backward for short sequences (up to 128 tokens): a Pallas (Triton) kernel for CUDA
GPUs, one program per (head, batch) holding the whole sequence.

I-JEPA's context encoder (68 tokens at ViT-H/14) and predictor (122) run attention on short
sequences, where cuDNN's flash backward, built for long ones, takes 3-4x the time its bytes need
(BENCHMARKS.md). With every key in one tile, the backward needs no saved softmax statistics, no
separate pass for rowsum(dO * O) and no float32 dq accumulator: each program recomputes the
probabilities from q and k, and writes dq, dk and dv once. On an H200 at ViT-H/14's shapes it
took 0.168 ms where cuDNN's backward took about 0.23 (context), and 0.436 where cuDNN's took
about 0.62 (predictor); a one-tile forward was no faster than cuDNN's (BENCHMARKS.md). The
model runs it as `attention.cudnn_attention_short_backward` where
`config.model.short_attention_backward` asks for it (`auto`, the default: on CUDA GPUs where its
startup check passes); whole training steps ran 3-4% faster at ViT-B/16 and 1.5% at ViT-H/14.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MAX_TOKENS = 128


def _next_power_of_two(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _slab(b, h, tokens, head_dim):
    """Sequence b's head h, a [tokens, head_dim] slab of arrays flattened to [batch * tokens,
    heads * head_dim], padded to powers of two: (indices, mask, load)."""
    from jax.experimental.pallas import triton as plgpu

    t = jnp.arange(_next_power_of_two(tokens))
    d = jnp.arange(_next_power_of_two(head_dim))
    mask = (t[:, None] < tokens) & (d[None, :] < head_dim)
    at = (b * tokens + t[:, None], h * head_dim + d[None, :])
    return at, mask, lambda ref: plgpu.load(ref.at[at], mask=mask, other=0.0)


def _kernel(q_ref, k_ref, v_ref, do_ref, len_ref, dqkv_ref, *, tokens, head_dim, scale):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    h, b = pl.program_id(0), pl.program_id(1)  # the grid's order: see attention_backward
    at, mask, load = _slab(b, h, tokens, head_dim)
    q, k, v, do = load(q_ref), load(k_ref), load(v_ref), load(do_ref)
    # Every key is in this tile, so the probabilities are recomputed exactly, not from saved
    # statistics.
    keys = jnp.arange(_next_power_of_two(tokens))
    length = plgpu.load(len_ref.at[b])
    logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(keys[None, :] < length, logits, jnp.finfo(jnp.float32).min)
    p = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
    p = p / jnp.sum(p, axis=1, keepdims=True)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))
    ds = ds.astype(q.dtype)
    dq = jnp.dot(ds, k, preferred_element_type=jnp.float32) * scale
    dk = jnp.dot(ds.T, q, preferred_element_type=jnp.float32) * scale
    dv = jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
    rows, cols = at
    width = q_ref.shape[1]
    for i, grad in enumerate((dq, dk, dv)):
        plgpu.store(dqkv_ref.at[rows, cols + i * width], grad.astype(dqkv_ref.dtype), mask=mask)


def _warps(head_dim: int) -> int:
    """Warps per program: 4 for heads up to 64 wide, whose small tiles do not keep 8 busy (at
    B/16's 32-wide predictor heads 0.43 ms a call against 0.48 on an H200; whole steps 0.4%
    faster); 8 for wider ones (4 took 1.8x as long at H/14's 80-wide context heads)."""
    return 4 if _next_power_of_two(head_dim) <= 64 else 8


@functools.partial(jax.jit, static_argnames=("scale", "warps", "interpret"))
def attention_backward(q, k, v, do, kv_lengths, *, scale, warps=None, interpret=False):
    """(dq, dk, dv) of softmax(q k^T * scale, keys masked past kv_lengths) v, for q, k, v and
    the output's gradient do, all [batch, tokens, heads, head_dim] with tokens <= 128.

    The kernel writes the three side by side in one [batch * tokens, 3 * heads * head_dim]
    array, the layout of a fused q/k/v projection's output: where the caller concatenates them
    back for that projection's backward, XLA folds the concatenation of these slices away."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    batch, tokens, heads, head_dim = q.shape
    if tokens > MAX_TOKENS:
        raise ValueError(f"{tokens} tokens: this kernel holds at most {MAX_TOKENS}")
    flat = [a.reshape(batch * tokens, heads * head_dim) for a in (q, k, v, do)]
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    rows, width = flat[0].shape
    dqkv = pl.pallas_call(
        functools.partial(_kernel, tokens=tokens, head_dim=head_dim, scale=scale),
        out_shape=jax.ShapeDtypeStruct((rows, 3 * width), q.dtype),
        # Heads vary fastest: neighbouring programs read neighbouring head_dim columns of the
        # same rows (1.4x faster at the predictor's 24-wide heads on an H200).
        grid=(heads, batch),
        in_specs=[anywhere] * 5,
        out_specs=anywhere,
        compiler_params=plgpu.CompilerParams(num_warps=warps or _warps(head_dim)),
        interpret=interpret,
        name="short_attention_backward",
    )(*flat, kv_lengths.astype(jnp.int32))
    return tuple(dqkv[:, i * width : (i + 1) * width].reshape(q.shape) for i in range(3))
