"""Meshes over the first devices of this machine (a CPU run has 8 virtual ones)."""

import jax
from ml_collections import ConfigDict

from jepa_jax import sharding


def mesh_of(data: int, fsdp: int) -> jax.sharding.Mesh:
    """The (data, fsdp) mesh of the first data * fsdp devices."""
    devices = jax.devices()[: data * fsdp]
    return sharding.make_mesh(ConfigDict({"data": data, "fsdp": fsdp}), devices=devices)
