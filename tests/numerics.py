"""Helpers for the numerics tests: relative error against a reference, fresh random keys, and
the exact GELU over every bfloat16 input."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64; NaN never passes."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert not np.isnan(x).any(), "NaN never passes"
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def fresh_key() -> jax.Array:
    """A key from a fresh seed, printed so that a failure shows how to reproduce it."""
    seed = np.random.SeedSequence().entropy % 2**31
    print(f"seed {seed}")
    return jax.random.key(seed)


def every_bfloat16() -> np.ndarray:
    """All 65,536 bfloat16 bit patterns, infinities and NaNs included."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(jnp.bfloat16)


def bfloat16_spacing(values) -> np.ndarray:
    """The gap between neighbouring bfloat16 values at |values| (8 significant bits)."""
    return 2.0 ** (np.floor(np.log2(np.abs(values))) - 7)


def gelu_float64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact GELU and its derivative in float64 (erfc keeps the negative tail precise)."""
    x = np.asarray(x, np.float64)
    cdf = 0.5 * np.vectorize(math.erfc)(-x / math.sqrt(2))
    return x * cdf, cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
