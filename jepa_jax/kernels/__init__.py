"""Custom GPU kernels, and whether they run here.

`dense`: a Linear layer whose matmul writes its column blocks (q, k, v) as separate arrays, a
Pallas Mosaic GPU kernel for Hopper. `config.model.fused_qkv` picks: "auto" runs it where it can
and XLA elsewhere, "on" insists (one clear error where it cannot run), "off" never runs it.
Parameters never depend on the choice.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jepa_jax.attention import gpu_compute_capability
from jepa_jax.kernels import dense

SETTINGS = ("auto", "on", "off")


class KernelUnavailableError(RuntimeError):
    """A kernel was asked for explicitly (`on`) but cannot run here."""


def setting(model_config) -> str:
    """`config.model.fused_qkv`; configs saved before the field ran XLA's path (`off`)."""
    return model_config.get("fused_qkv", "off")


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


def unavailable_reason(dtype, num_devices: int) -> str | None:
    """Why the q/k/v kernel cannot run for this compute dtype and device count."""
    capability = gpu_compute_capability()
    if capability is None:
        return f"no CUDA GPU (JAX backend is {jax.default_backend()})"
    if capability[0] != 9:
        major, minor = capability
        return f"GPU compute capability {major}.{minor}: the kernel is written for Hopper (9.0)"
    if jnp.dtype(dtype) != jnp.bfloat16:
        return f"compute dtype {jnp.dtype(dtype).name}: the kernel takes bfloat16"
    if num_devices > 1:
        # XLA's partitioner cannot split a Pallas call: a sharded step would gather its inputs.
        return f"{num_devices} devices: the kernel runs on one device only so far"
    return _self_check()


@functools.cache
def _self_check() -> str | None:
    """Run the kernel once on a small input with a known result, so that a jax whose Mosaic GPU
    API has moved falls back to XLA at startup instead of failing in the first step. Compiled
    ahead of time and called on NumPy arrays, it runs even when first asked inside a trace."""
    x, w = np.ones((128, 256), jnp.bfloat16), np.ones((256, 384), jnp.bfloat16)
    b = np.full((384,), 2.0, np.float32)
    try:
        run = jax.jit(functools.partial(dense.dense_split, splits=3)).lower(x, w, b).compile()
        if not all(np.all(np.asarray(o) == 258) for o in run(x, w, b)):  # 256 + 2, exact in bf16
            return "the kernel computed a wrong result in its startup check"
    except Exception as e:  # any failure to lower, compile or run means: use XLA
        return f"the kernel failed its startup check ({type(e).__name__}: {str(e)[:200]})"
    return None


def resolve(setting: str, *, dtype, num_devices: int, widths: dict[str, int]) -> FusedQKV:
    """What `config.model.fused_qkv` means here, for networks of these attention widths; raises
    KernelUnavailableError for an `on` that cannot run, naming the cause and the fix."""
    if setting not in SETTINGS:
        raise ValueError(f"fused_qkv={setting!r}: choose one of {SETTINGS}")
    if setting == "off":
        return FusedQKV(setting, False, "config.model.fused_qkv=off")
    tiled = tuple(name for name, width in widths.items() if dense.width_tiles(width))
    reason = unavailable_reason(dtype, num_devices)
    if reason is None and not tiled:
        listed = ", ".join(f"{name} {width}" for name, width in widths.items())
        reason = (
            f"it tiles none of these widths: {listed} (it takes 256, 384, 512, 768, 1024, "
            "1280, ...: kernels.dense.tiling_for)"
        )
    if reason and setting == "on":
        raise KernelUnavailableError(
            f"config.model.fused_qkv=on, but the q/k/v kernel cannot run here: {reason}. "
            "Use --config.model.fused_qkv=auto (XLA where it cannot run) or off."
        )
    return FusedQKV(setting, reason is None, reason, tiled if reason is None else ())
