"""Helpers for the numerics tests: relative error against a reference, fresh random keys."""

import jax
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
