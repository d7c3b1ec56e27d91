"""Custom GPU kernels, and whether they run here.

`dense`: a Linear layer whose matmul writes its column blocks (q, k, v) as separate arrays, a
Pallas Mosaic GPU kernel for Hopper. `config.model.fused_qkv` picks: "auto" runs it where it can
and XLA elsewhere, "on" insists (one clear error where it cannot run), "off" never runs it.
Parameters never depend on the choice.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

SETTINGS = ("auto", "on", "off")


class KernelUnavailableError(RuntimeError):
    """A kernel was asked for explicitly (`on`) but cannot run here."""


@dataclasses.dataclass(frozen=True)
class FusedQKV:
    """Whether the q/k/v kernel runs (`on`) for what was asked, and why not (`reason`)."""

    requested: str
    on: bool
    reason: str | None = None

    def describe(self) -> str:
        if self.on:
            return (
                "Fused q/k/v: on (Pallas Hopper kernel: the q/k/v projection writes q, k and v "
                "apart; XLA where a shape does not tile)"
            )
        return f"Fused q/k/v: off ({self.reason})"


def unavailable_reason(dtype, num_devices: int) -> str | None:
    """Why the q/k/v kernel cannot run for this compute dtype and device count."""
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    capability = getattr(gpus[0], "compute_capability", None) if gpus else None
    if capability is None:
        return f"no CUDA GPU (JAX backend is {jax.default_backend()})"
    if capability.split(".")[0] != "9":
        return f"GPU compute capability {capability}: the kernel is written for Hopper (9.0)"
    if jnp.dtype(dtype) != jnp.bfloat16:
        return f"compute dtype {jnp.dtype(dtype).name}: the kernel takes bfloat16"
    if num_devices > 1:
        # XLA's partitioner cannot split a Pallas call: a sharded step would gather its inputs.
        return f"{num_devices} devices: the kernel runs on one device only so far"
    return None


def resolve(setting: str, *, dtype, num_devices: int) -> FusedQKV:
    """What `config.model.fused_qkv` means here; raises KernelUnavailableError for an `on` that
    cannot run, naming the cause and the fix."""
    if setting not in SETTINGS:
        raise ValueError(f"fused_qkv={setting!r}: choose one of {SETTINGS}")
    if setting == "off":
        return FusedQKV(setting, False, "config.model.fused_qkv=off")
    reason = unavailable_reason(dtype, num_devices)
    if reason and setting == "on":
        raise KernelUnavailableError(
            f"config.model.fused_qkv=on, but the q/k/v kernel cannot run here: {reason}. "
            "Use --config.model.fused_qkv=auto (XLA where it cannot run) or off."
        )
    return FusedQKV(setting, reason is None, reason)
