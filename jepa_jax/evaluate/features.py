"""Frozen features: the encoder from a workdir (or at init), extracted jitted over the mesh.

Features are average-pooled patch tokens of the encoder output (`avgpool`, the paper's), or
the concatenated average-pooled outputs of the last four blocks, each through the encoder's
final LayerNorm (`last4`). Matmuls run in bfloat16 and everything else in float32, as training
does, whatever dtypes the run itself trained with.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jepa_jax import checkpoint, data, models, sharding
from jepa_jax.evaluate import datasets
from jepa_jax.models import vit

FEATURES = ("avgpool", "last4")
ENCODERS = tuple(checkpoint.ENCODERS)  # "target", "context": what a workdir holds


@dataclasses.dataclass
class Encoder:
    """An encoder ready to extract: structure, float32 parameters and where they came from."""

    graphdef: nnx.GraphDef
    params: dict
    config: ml_collections.ConfigDict  # the workdir's run config
    name: str  # "target", "context" or "random_init"
    step: int  # the checkpoint step whose config (and, unless random_init, weights) are used
    step_dir: str


def read_config(workdir: str) -> tuple[str, ml_collections.ConfigDict]:
    """(latest step folder, its run config) of a workdir or step folder; DataError if none."""
    try:
        return checkpoint.read_config(workdir)
    except FileNotFoundError as e:
        raise datasets.DataError(f"--workdir={workdir}: {e}") from None


def eval_model_config(config, attention: str | None = None) -> ml_collections.ConfigDict:
    """config.model with bfloat16 matmuls, a float32 stream and the q/k/v and GELU kernels
    wherever they can run, without the attention backward kernel: features need no backward
    (parameters do not change)."""
    m = ml_collections.ConfigDict(config.model.to_dict())
    m.dtype, m.residual_dtype, m.fused_qkv = "bfloat16", "float32", "auto"
    m.gelu_kernel = "auto"
    m.short_attention_backward = "off"
    if attention:
        m.attention = attention
    return m


def load(
    workdir: str,
    which: str = "target",
    *,
    random_init: bool = False,
    attention: str = "auto",
    seed: int | None = None,
) -> Encoder:
    """The `which` encoder of a workdir's latest checkpoint, or with `random_init` the same
    architecture at initialisation (seeded as the run was unless `seed` is given)."""
    if which not in ENCODERS:
        raise datasets.DataError(f"--which={which}: choose one of {', '.join(ENCODERS)}")
    step_dir, config = read_config(workdir)
    m = eval_model_config(config, attention)
    if random_init:
        init_seed = config.seed if seed is None else seed
        encoder = models.from_config(m, seed=init_seed).encoder
        params, name = nnx.to_pure_dict(nnx.state(encoder)), "random_init"
    else:
        trained, _ = models.load_encoder(step_dir, which, attention=attention)
        encoder = nnx.eval_shape(lambda: models.from_config(m, seed=0).encoder)
        params, name = nnx.to_pure_dict(nnx.state(trained)), which
    return Encoder(
        nnx.graphdef(encoder), params, config, name, int(os.path.basename(step_dir)), step_dir
    )


def pooled(encoder: vit.VisionTransformer, images: jax.Array, kind: str) -> jax.Array:
    """float32 [B, D] (avgpool) or [B, 4D] (last4) features of normalised images."""
    if kind == "avgpool":
        return encoder(images).astype(jnp.float32).mean(axis=1)
    if kind != "last4":
        raise ValueError(f"features={kind!r}: choose one of {', '.join(FEATURES)}")
    depth = encoder.blocks.depth
    if depth < 4:
        raise ValueError(
            f"features=last4 reads the last 4 blocks; this encoder has {depth}: use avgpool"
        )
    # VisionTransformer.__call__, keeping the last four block outputs.
    encoder.check_images(images.shape)
    patches = vit.patchify(images.astype(encoder.dtype), encoder.patch_size)
    pos = jnp.asarray(vit.sincos_pos_embed(encoder.size.width, *encoder.grid), jnp.float32)
    x = encoder.patch_embed(patches) + pos.astype(encoder.residual_dtype)
    graphdef, stacked = nnx.split(encoder.blocks.layers)
    first = jax.tree.map(lambda a: a[: depth - 4], stacked)
    last = jax.tree.map(lambda a: a[depth - 4 :], stacked)

    def step(x, layer):
        x = nnx.merge(graphdef, layer)(x)
        return x, encoder.norm(x).astype(jnp.float32).mean(axis=1)

    unroll = 1 if encoder.blocks.scan else depth
    x, _ = jax.lax.scan(step, x, first, unroll=unroll)
    _, outs = jax.lax.scan(step, x, last, unroll=unroll)  # [4, B, D]
    return jnp.concatenate(list(outs), axis=-1)


def make_extract(
    graphdef: nnx.GraphDef, kind: str, mesh: jax.sharding.Mesh
) -> Callable[[dict, jax.Array], jax.Array]:
    """jit(params, uint8 images [B, S, S, 3] sharded over the mesh) -> sharded features."""

    def extract(params, images):
        return pooled(nnx.merge(graphdef, params), data.normalize(images), kind)

    return jax.jit(sharding.traced_on(mesh, extract), out_shardings=sharding.batch_sharding(mesh))


def eval_mesh(devices=None) -> jax.sharding.Mesh:
    """Every device on the 'data' axis: evaluation keeps a whole encoder per device."""
    return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}), devices)


def global_batch_size(requested: int, mesh: jax.sharding.Mesh) -> int:
    """`requested` rounded up to a multiple of the device count."""
    return max(1, -(-requested // mesh.size)) * mesh.size


def extract_features(
    extract: Callable,
    params: dict,
    labelled: datasets.LabelledImages,
    *,
    image_size: int,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    threads: int = 16,
) -> tuple[np.ndarray, float]:
    """(float32 [N, D] features of every image in dataset order, seconds taken)."""
    batch_size = global_batch_size(batch_size, mesh)
    start = time.perf_counter()
    outputs = []
    for local in datasets.batches(labelled, image_size, batch_size, threads=threads):
        batch = sharding.global_batch(mesh, {"images": local["images"]})
        outputs.append(extract(params, batch["images"]))  # async: the host reads on meanwhile
    gathered = [
        np.asarray(
            multihost_utils.process_allgather(f, tiled=True) if jax.process_count() > 1 else f
        )
        for f in outputs
    ]
    features = np.concatenate(gathered)[: len(labelled)]
    return features, time.perf_counter() - start
