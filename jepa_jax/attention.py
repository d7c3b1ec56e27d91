"""The attention seam: one signature, several implementations, picked by name.

Every attention layer of the encoders and the predictor calls `attn(q, k, v, kv_lengths=...)`
with BTNH inputs (batch, tokens, heads, head dim). `kv_lengths` [B] marks how many leading
tokens of each sequence are real; the rest is padding that must not be attended to.
Implementations hold no parameters, so a checkpoint works with every one of them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jepa_jax import sharding

IMPLEMENTATIONS = ("auto", "cudnn", "xla", "reference")
# cuDNN's training kernels reject some sequence lengths (odd ones, seen on an H100); padding to a
# multiple of 8 keeps every length the model produces legal and the tiles aligned.
CUDNN_SEQ_MULTIPLE = 8

AttentionFn = Callable[..., jax.Array]


class AttentionUnavailableError(RuntimeError):
    """An attention implementation was asked for explicitly but cannot run here."""


def _length_mask(kv_lengths: jax.Array | None, num_keys: int) -> jax.Array | None:
    """[B, 1, 1, S] True where a key is real."""
    if kv_lengths is None:
        return None
    return (jnp.arange(num_keys)[None, :] < kv_lengths[:, None])[:, None, None, :]


def reference_attention(q, k, v, *, kv_lengths=None):
    """Plain einsum attention with a float32 softmax: the readable definition, any platform."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    mask = _length_mask(kv_lengths, k.shape[1])
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


def xla_attention(q, k, v, *, kv_lengths=None):
    """`jax.nn.dot_product_attention` lowered by XLA."""
    return jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=kv_lengths, implementation="xla"
    )


def cudnn_attention(q, k, v, *, kv_lengths=None):
    """cuDNN flash attention for any sequence length: pad, mask the padding, slice it off."""
    tokens = q.shape[1]
    (q, k, v), kv_lengths = pad_tokens((q, k, v), kv_lengths, CUDNN_SEQ_MULTIPLE)
    return _cudnn(q, k, v, kv_lengths)[:, :tokens]


def cudnn_attention_short_backward(q, k, v, *, kv_lengths=None):
    """`cudnn_attention` whose backward, for sequences of at most 128 tokens, runs in a Pallas
    kernel (`kernels.short_attention`) instead of cuDNN's flash backward. Such sequences are
    not padded: cuDNN runs only their forward, which takes any length (the training kernels
    are the ones that reject some), and the kernel takes any length up to 128."""
    # Where a mesh's devices cannot each take whole sequences, the kernel would get them all.
    if not _short(q.shape[1]) or sharding.local_shape(q.shape) is None:
        return cudnn_attention(q, k, v, kv_lengths=kv_lengths)
    return _cudnn_then_kernel(q, k, v, kv_lengths)


def cudnn_attention_forward(q, k, v, *, kv_lengths=None):
    """cuDNN flash attention for a network that is never differentiated (the EMA target
    encoder): its forward takes any sequence length, so nothing is padded."""
    return _cudnn_forward_only(q, k, v, kv_lengths)


@jax.custom_vjp
def _cudnn_forward_only(q, k, v, kv_lengths):
    return _cudnn(q, k, v, kv_lengths)


def _refuse_gradient(*_):
    raise TypeError(
        "cudnn_attention_forward is for networks that are never differentiated (the target "
        "encoder); differentiate through cudnn_attention instead"
    )


_cudnn_forward_only.defvjp(_refuse_gradient, _refuse_gradient)


# cuDNN's calls that a network trains through: they pad where cuDNN's training kernels need it.
_CUDNN_TRAINABLE = (cudnn_attention, cudnn_attention_short_backward)


def runs_cudnn(attn_fn: AttentionFn) -> bool:
    """Whether `attn_fn` is one of cuDNN's calls, trained through or forward only."""
    return attn_fn in _CUDNN_TRAINABLE or attn_fn is cudnn_attention_forward


def forward_only(attn_fn: AttentionFn) -> AttentionFn:
    """The attention for a network that only runs forward: cuDNN's without the padding its
    training kernels need, or `attn_fn` itself where it is not cuDNN's."""
    return cudnn_attention_forward if attn_fn in _CUDNN_TRAINABLE else attn_fn


def _short(tokens: int) -> bool:
    """Whether `cudnn_attention_short_backward` runs the kernel for `tokens`-long sequences."""
    from jepa_jax.kernels import short_attention  # here: the kernels package imports this module

    return tokens <= short_attention.MAX_TOKENS


def _cudnn(q, k, v, kv_lengths):
    # cuDNN's partitioning rule stops the compile unless q, k and v are sharded alike, and
    # sharding propagation alone gave an FSDP step's k and v no batch split (a replicated k, v
    # beside a split q: "Query, key and value should have same sharding").
    q, k, v = sharding.split_batch(q, k, v)
    return jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=kv_lengths, implementation="cudnn"
    )


@jax.custom_vjp
def _cudnn_then_kernel(q, k, v, kv_lengths):
    return _cudnn(q, k, v, kv_lengths)


def _cudnn_then_kernel_forward(q, k, v, kv_lengths):
    # Only the inputs are kept: the kernel recomputes the probabilities.
    return _cudnn(q, k, v, kv_lengths), (q, k, v, kv_lengths)


def _cudnn_then_kernel_backward(residuals, grad):
    from jepa_jax.kernels import short_attention

    q, k, v, kv_lengths = residuals
    batch, tokens = q.shape[:2]
    lengths = jnp.full((batch,), tokens, jnp.int32) if kv_lengths is None else kv_lengths
    scale = q.shape[-1] ** -0.5
    kernel = functools.partial(short_attention.attention_backward, scale=scale)
    grads = sharding.on_each_device(kernel, q, k, v, grad.astype(q.dtype), lengths)
    return (*grads, None)


_cudnn_then_kernel.defvjp(_cudnn_then_kernel_forward, _cudnn_then_kernel_backward)


def pad_tokens(arrays, kv_lengths, multiple: int):
    """Arrays [batch, tokens, ...] padded along tokens to a multiple of `multiple`, and the key
    lengths that mask the padding out of attention (queries there are sliced off after)."""
    batch, tokens = arrays[0].shape[:2]
    padded = -(-tokens // multiple) * multiple
    if padded == tokens:
        return tuple(arrays), kv_lengths
    pad = [(0, 0), (0, padded - tokens)]
    arrays = tuple(jnp.pad(a, pad + [(0, 0)] * (a.ndim - 2)) for a in arrays)
    if kv_lengths is None:
        kv_lengths = jnp.full((batch,), tokens, jnp.int32)
    return arrays, kv_lengths


def seq_multiple(attn_fn: AttentionFn, tokens: int) -> int:
    """The token multiple `attn_fn` pads `tokens`-long sequences to inside (cuDNN's), for a
    caller that can pad earlier, where it is cheaper."""
    if attn_fn is cudnn_attention_short_backward and _short(tokens):
        return 1
    return CUDNN_SEQ_MULTIPLE if attn_fn in _CUDNN_TRAINABLE else 1


_BY_NAME: dict[str, AttentionFn] = {
    "cudnn": cudnn_attention,
    "xla": xla_attention,
    "reference": reference_attention,
}


def get(name: str) -> AttentionFn:
    """The attention function for a concrete implementation name."""
    if name not in _BY_NAME:
        raise ValueError(
            f"attention={name!r}: not an implementation; choose one of {IMPLEMENTATIONS}"
        )
    return _BY_NAME[name]


def gpu_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first CUDA GPU, or None without one."""
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus or not hasattr(gpus[0], "compute_capability"):
        return None
    major, _, minor = gpus[0].compute_capability.partition(".")
    if not (major.isdigit() and minor.isdigit()):  # e.g. "gfx942" on ROCm: not CUDA
        return None
    return int(major), int(minor)


def no_cuda_gpu_reason() -> str:
    """The reason every CUDA-only path gives where `gpu_compute_capability()` is None."""
    return f"no CUDA GPU (JAX backend is {jax.default_backend()})"


@functools.cache
def _cudnn_probe() -> str | None:
    """Run a tiny cuDNN forward+backward once; None if it works, else the reason it does not."""
    capability = gpu_compute_capability()
    if capability is None:
        return no_cuda_gpu_reason()
    if capability < (8, 0):
        return f"GPU compute capability {capability} < 8.0 (cuDNN flash attention needs Ampere+)"
    try:
        x = jnp.ones((1, 8, 1, 64), jnp.bfloat16)
        grad = jax.grad(lambda q: cudnn_attention(q, x, x).astype(jnp.float32).sum())(x)
        jax.block_until_ready(grad)
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here"; we report it
        return f"cuDNN attention failed to run: {type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def cudnn_unsupported(dtype=None, head_dims: tuple[int, ...] = ()) -> str | None:
    """Why cuDNN attention cannot run here for this dtype and these head dims (None: it can)."""
    reason = _cudnn_probe()
    if reason:
        return reason
    if dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"compute dtype {jnp.dtype(dtype).name}: cuDNN attention needs bfloat16 or float16"
    max_head = 256 if gpu_compute_capability() >= (9, 0) else 128
    bad = sorted({h for h in head_dims if h % 8 or h > max_head})
    if bad:
        return f"head dims {bad}: cuDNN needs a multiple of 8, at most {max_head}"
    return None


def status() -> dict[str, str | None]:
    """Each concrete implementation -> None if it runs on this machine, else why not."""
    return {"cudnn": cudnn_unsupported(), "xla": None, "reference": None}


@dataclasses.dataclass(frozen=True)
class Choice:
    """What runs (`name`) for what was asked (`requested`), and why they differ (`reason`);
    whether cuDNN's backward of short sequences runs in the kernel (`short_backward`), and why
    not where it was asked for (`short_backward_reason`)."""

    requested: str
    name: str
    reason: str | None = None
    short_backward: bool = False
    short_backward_reason: str | None = None

    @property
    def fn(self) -> AttentionFn:
        """`name`'s function; cuDNN's with the kernel backward where `short_backward`."""
        return cudnn_attention_short_backward if self.short_backward else get(self.name)


def resolve(requested: str, *, dtype, head_dims: tuple[int, ...]) -> Choice:
    """Turn a config value into the implementation that will run.

    `auto` picks cuDNN where it can run and otherwise the fastest correct path for the
    platform (the einsum reference: XLA's generic lowering is slower at ViT sizes). An explicit
    `cudnn` that cannot run raises; it never silently changes. (Whether cuDNN's backward of short
    sequences runs in a kernel is `kernels.resolve_short_backward`'s choice.)
    """
    if requested not in IMPLEMENTATIONS:
        raise ValueError(
            f"config.model.attention={requested!r}: unknown; choose one of {IMPLEMENTATIONS}"
        )
    if requested in ("xla", "reference"):
        return Choice(requested, requested)
    why_not = cudnn_unsupported(dtype, head_dims)
    if requested == "cudnn":
        if why_not:
            raise AttentionUnavailableError(
                f"config.model.attention=cudnn cannot run here: {why_not}. "
                "Use --config.model.attention=auto (falls back) or xla/reference."
            )
        return Choice("cudnn", "cudnn")
    if why_not:
        return Choice("auto", "reference", f"cudnn unavailable: {why_not}")
    return Choice("auto", "cudnn")


def describe(choice: Choice, layers: dict[str, int]) -> str:
    """The one startup line: what runs, in how many layers, and why if not what was asked."""
    total = sum(layers.values())
    parts = ", ".join(f"{k} {v}" for k, v in layers.items())
    line = f"Attention: {choice.name} in {total} attention layers ({parts})"
    if choice.reason:  # auto fell back: say from what, and why
        line += f"; requested {choice.requested}, {choice.reason}"
    if choice.short_backward:
        line += "; the backward of sequences up to 128 tokens in a Pallas kernel"
    elif choice.short_backward_reason:
        line += f"; short-sequence backward kernel off ({choice.short_backward_reason})"
    return line


def startup_line(choice: Choice, layers: dict[str, int]) -> str:
    """`describe`, marked `Warning: ` only where a GPU is present but cuDNN cannot run on it: on
    a machine with no GPU, auto's fallback is what is expected, so the line is plain."""
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    return ("Warning: " if choice.reason and has_gpu else "") + describe(choice, layers)


def log_startup(choice: Choice, layers: dict[str, int]) -> None:
    """Print the startup line on process 0."""
    if jax.process_index() == 0:
        print(startup_line(choice, layers), flush=True)
