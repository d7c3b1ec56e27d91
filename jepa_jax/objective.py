"""I-JEPA's objective: the EMA encoder's normalised features at the target blocks, and the
predictor's Huber loss against them. Pure functions of parameters and one batch; the trainer
differentiates `prediction_loss`, and the bench times the same two functions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jepa_jax import attention as attention_lib
from jepa_jax import kernels

TARGET_LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Networks:
    """The static half of the models (structure + attention fn); params travel separately."""

    encoder: nnx.GraphDef
    target_encoder: nnx.GraphDef  # the encoder's, or its FP8 copy (models.fp8)
    predictor: nnx.GraphDef
    attention: attention_lib.Choice
    layer_counts: dict
    fused_qkv: kernels.FusedQKV
    gelu_kernel: kernels.GeluKernel


def target_features(net: Networks, target_params, images: jax.Array, target_idx) -> jax.Array:
    """[B, M, Kt, D] float32 targets: the EMA encoder on the full normalised images, LayerNorm
    without affine (eps 1e-5), gathered at the target blocks' tokens."""
    h = nnx.merge(net.target_encoder, target_params)(images).astype(jnp.float32)
    mean = h.mean(-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(h.var(-1, keepdims=True) + TARGET_LN_EPS)
    b, m, kt = target_idx.shape
    gathered = jnp.take_along_axis(h, target_idx.reshape(b, m * kt, 1), axis=1)
    return gathered.reshape(b, m, kt, -1)


def predict(params, net: Networks, images: jax.Array, batch) -> jax.Array:
    """[B, M, Kt, D]: the context encoder on the context tokens, then the predictor."""
    encoder = nnx.merge(net.encoder, params["encoder"])
    predictor = nnx.merge(net.predictor, params["predictor"])
    context = encoder(images, batch["context_idx"])
    return predictor(context, batch["context_idx"], batch["target_idx"], batch["target_len"])


def prediction_loss(params, net: Networks, images: jax.Array, batch, targets) -> jax.Array:
    """Huber (delta 1, = smooth L1 beta 1) mean over the real target tokens and features."""
    pred = predict(params, net, images, batch)
    kt = batch["target_idx"].shape[-1]
    real = (jnp.arange(kt) < batch["target_len"][..., None])[..., None]
    # where, not multiply: garbage in padded rows must not leak into the mean or its gradient.
    err = jnp.where(real, optax.huber_loss(pred.astype(jnp.float32), targets, delta=1.0), 0.0)
    return err.sum() / (real.sum() * targets.shape[-1])
