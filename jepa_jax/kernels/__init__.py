"""Custom GPU kernels, and whether they run here.

`dense`: Linear layers with their epilogue (bias, exact GELU, the q/k/v split) inside the matmul,
a Pallas Mosaic GPU kernel for Hopper. `config.model.fused_dense` picks: "auto" runs it where it
can and XLA elsewhere, "on" insists (one clear error where it cannot run), "off" never runs it.
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
class FusedDense:
    """Whether the fused dense kernel runs (`on`) for what was asked, and why not (`reason`)."""

    requested: str
    on: bool
    reason: str | None = None

    def describe(self) -> str:
        if self.on:
            return (
                "Fused dense: on (Pallas Hopper kernel: bias + exact GELU after fc1 and the q/k/v "
                "split run inside the matmul; XLA where a shape does not tile)"
            )
        return f"Fused dense: off ({self.reason})"


def unavailable_reason(dtype, num_devices: int) -> str | None:
    """Why the fused dense kernel cannot run for this compute dtype and device count."""
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


def resolve(setting: str, *, dtype, num_devices: int) -> FusedDense:
    """What `config.model.fused_dense` means here; raises KernelUnavailableError for an `on` that
    cannot run, naming the cause and the fix."""
    if setting not in SETTINGS:
        raise ValueError(f"fused_dense={setting!r}: choose one of {SETTINGS}")
    if setting == "off":
        return FusedDense(setting, False, "config.model.fused_dense=off")
    reason = unavailable_reason(dtype, num_devices)
    if reason and setting == "on":
        raise KernelUnavailableError(
            f"config.model.fused_dense=on, but the fused dense kernel cannot run here: {reason}. "
            "Use --config.model.fused_dense=auto (XLA where it cannot run) or off."
        )
    return FusedDense(setting, reason is None, reason)
