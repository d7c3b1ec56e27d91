"""Custom GPU kernels, and whether they run here.

- `dense`: a Linear layer whose matmul writes its column blocks (q, k, v) as separate arrays, a
  Pallas Mosaic GPU kernel for Hopper (`config.model.fused_qkv`).
- `short_attention`: attention's backward for sequences of at most 128 tokens, a Pallas Triton
  kernel that replaces cuDNN's (`config.model.short_attention_backward`).
- `gelu`: the MLPs' exact GELU forward, a Pallas Triton kernel (`config.model.gelu_kernel`).

Each setting is "auto" (the kernel where it can run, XLA's or cuDNN's path elsewhere), "on"
(one clear error where it cannot run) or "off". Parameters never depend on the choice.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jepa_jax.attention import (
    Choice,
    gpu_compute_capability,
    no_cuda_gpu_reason,
    reference_attention,
)
from jepa_jax.kernels import dense, gelu, short_attention

SETTINGS = ("auto", "on", "off")
GELU_FORMULAS = ("exact", "tanh")  # config.model.gelu; the GELU kernel computes the exact one


class KernelUnavailableError(RuntimeError):
    """A kernel was asked for explicitly (`on`) but cannot run here."""


def setting(model_config, field: str) -> str:
    """`config.model.<field>` (fused_qkv, short_attention_backward, gelu_kernel); configs saved
    before the field ran without the kernel (`off`)."""
    return model_config.get(field, "off")


def _check_setting(field: str, setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"{field}={setting!r}: choose one of {SETTINGS}")


def _unavailable(field: str, kernel: str, reason: str, fallback: str) -> KernelUnavailableError:
    """The error for `config.model.<field>=on` where `kernel` cannot run: the cause, the fix."""
    return KernelUnavailableError(
        f"config.model.{field}=on, but {kernel} cannot run here: {reason}. "
        f"Use --config.model.{field}=auto ({fallback} where it cannot run) or off."
    )


@dataclasses.dataclass(frozen=True)
class FusedQKV:
    """Whether the q/k/v kernel runs (`on`) for what was asked, in which networks (those whose
    width it tiles), and why not (`reason`)."""

    requested: str
    on: bool
    reason: str | None = None
    networks: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.on:
            return (
                f"Fused q/k/v: on in the {' and the '.join(self.networks)} (Pallas Hopper "
                "kernel: the q/k/v projection writes q, k and v apart; XLA where a batch's rows "
                "do not tile)"
            )
        return f"Fused q/k/v: off ({self.reason})"


def unavailable_reason(dtype) -> str | None:
    """Why the q/k/v kernel cannot run for this compute dtype."""
    capability = gpu_compute_capability()
    if capability is None:
        return no_cuda_gpu_reason()
    if capability[0] != 9:
        major, minor = capability
        return f"GPU compute capability {major}.{minor}: the kernel is written for Hopper (9.0)"
    if jnp.dtype(dtype) != jnp.bfloat16:
        return f"compute dtype {jnp.dtype(dtype).name}: the kernel takes bfloat16"
    return _self_check()


def _startup_check(kernel, args, expected, tolerance: float) -> str | None:
    """Run `kernel(*args)` once and compare its outputs with `expected`, so that a jax whose
    Pallas API has moved falls back at startup instead of failing in the first step. Compiled
    ahead of time and called on NumPy arrays, it runs even when first asked inside a trace."""
    try:
        outs = jax.jit(kernel).lower(*args).compile()(*args)
        if not all(
            np.allclose(np.asarray(o, np.float32), e, rtol=tolerance, atol=tolerance)
            for o, e in zip(outs, expected, strict=True)
        ):
            return "the kernel computed a wrong result in its startup check"
    except Exception as e:  # any failure to lower, compile or run means: do without it
        return f"the kernel failed its startup check ({type(e).__name__}: {str(e)[:200]})"
    return None


@functools.cache
def _self_check() -> str | None:
    """The q/k/v kernel on ones: every output 256 + 2, exact in bf16."""
    x, w = np.ones((128, 256), jnp.bfloat16), np.ones((256, 384), jnp.bfloat16)
    b = np.full((384,), 2.0, np.float32)
    kernel = functools.partial(dense.dense_split, splits=3)
    return _startup_check(kernel, (x, w, b), [np.full((128, 128), 258.0)] * 3, tolerance=0)


def resolve(setting: str, *, dtype, widths: dict[str, int]) -> FusedQKV:
    """What `config.model.fused_qkv` means here, for networks of these attention widths; raises
    KernelUnavailableError for an `on` that cannot run, naming the cause and the fix."""
    _check_setting("fused_qkv", setting)
    if setting == "off":
        return FusedQKV(setting, False, "config.model.fused_qkv=off")
    tiled = tuple(name for name, width in widths.items() if dense.width_tiles(width))
    reason = unavailable_reason(dtype)
    if reason is None and not tiled:
        listed = ", ".join(f"{name} {width}" for name, width in widths.items())
        reason = (
            f"it tiles none of these widths: {listed} (it takes 256, 384, 512, 768, 1024, "
            "1280, ...: kernels.dense.tiling_for)"
        )
    if reason and setting == "on":
        raise _unavailable("fused_qkv", "the q/k/v kernel", reason, "XLA")
    return FusedQKV(setting, reason is None, reason, tiled if reason is None else ())


def resolve_short_backward(setting: str, choice: Choice) -> Choice:
    """`choice` with cuDNN's backward of short sequences in `short_attention`'s kernel where
    `config.model.short_attention_backward` asks for it and it can run; raises
    KernelUnavailableError for an `on` that cannot, naming the cause and the fix."""
    _check_setting("short_attention_backward", setting)
    if setting == "off":
        return choice
    if choice.name != "cudnn":
        if setting == "on":
            reason = f"attention is {choice.name}: the kernel replaces cuDNN's backward"
            raise _unavailable("short_attention_backward", "the kernel", reason, "cuDNN's backward")
        return choice  # auto: the Attention line already says cuDNN does not run
    reason = _short_backward_check()
    if reason and setting == "on":
        raise _unavailable("short_attention_backward", "the kernel", reason, "cuDNN's backward")
    return dataclasses.replace(choice, short_backward=reason is None, short_backward_reason=reason)


@functools.cache
def _short_backward_check() -> str | None:
    """The backward kernel on fixed random inputs (16 tokens, keys masked past 11 in one
    sequence), against autodiff of the float32 reference attention."""
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((2, 16, 2, 16)).astype(jnp.bfloat16) for _ in range(4))
    lengths = np.array([11, 16], np.int32)
    with jax.ensure_compile_time_eval():  # concrete even when first asked inside a trace
        f32 = [jnp.asarray(a, jnp.float32) for a in (q, k, v, do)]
        _, vjp = jax.vjp(lambda *a: reference_attention(*a, kv_lengths=lengths), *f32[:3])
        expected = [np.asarray(g) for g in vjp(f32[3])]
    kernel = functools.partial(short_attention.attention_backward, scale=0.25)
    return _startup_check(kernel, (q, k, v, do, lengths), expected, tolerance=2e-2)


@dataclasses.dataclass(frozen=True)
class GeluKernel:
    """Whether the MLPs' GELU forward runs in `gelu`'s kernel (`on`), and why not (`reason`);
    `formula` is `config.model.gelu` (the kernel computes the exact one only)."""

    on: bool
    reason: str | None = None
    formula: str = "exact"

    def describe(self) -> str:
        if self.formula == "tanh":
            return "GELU: tanh approximation (config.model.gelu=tanh; on CUDA, inside fc1's GEMM)"
        if self.on:
            return "GELU: forward in a Pallas kernel (XLA's where a shape does not tile)"
        return f"GELU: XLA ({self.reason})"


def resolve_gelu(setting: str, formula: str = "exact") -> GeluKernel:
    """What `config.model.gelu_kernel` means here for `config.model.gelu`'s `formula`; raises
    KernelUnavailableError for an `on` that cannot run, naming the cause and the fix."""
    _check_setting("gelu_kernel", setting)
    if formula not in GELU_FORMULAS:
        raise ValueError(f"config.model.gelu={formula!r}: choose one of {list(GELU_FORMULAS)}")
    if formula == "tanh":
        if setting == "on":
            raise _unavailable(
                "gelu_kernel",
                "the GELU kernel",
                "it computes the exact GELU, not config.model.gelu=tanh's approximation",
                "XLA's tanh GELU",
            )
        return GeluKernel(False, "config.model.gelu=tanh", formula)
    if setting == "off":
        return GeluKernel(False, "config.model.gelu_kernel=off")
    reason = _gpu_reason() or _gelu_check()
    if reason and setting == "on":
        raise _unavailable("gelu_kernel", "the GELU kernel", reason, "XLA")
    return GeluKernel(reason is None, reason)


def _gpu_reason() -> str | None:
    return no_cuda_gpu_reason() if gpu_compute_capability() is None else None


@functools.cache
def _gelu_check() -> str | None:
    """The kernel on fixed random bf16 inputs, against the exact GELU in float32."""
    x = (np.random.default_rng(0).standard_normal(gelu.ROWS * gelu.COLUMNS) * 3).astype(
        jnp.bfloat16
    )
    xf = x.astype(np.float32)
    with jax.ensure_compile_time_eval():
        expected = np.asarray(jax.nn.gelu(jnp.asarray(xf), approximate=False))
    return _startup_check(lambda a: (gelu.gelu(a),), (x,), [expected], tolerance=1e-2)
