"""The I-JEPA predictor: a narrow transformer that guesses target-block features from context."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jepa_jax.attention import AttentionFn
from jepa_jax.models.activations import gelu
from jepa_jax.models.vit import BlockStack, _layer_norm, _linear, dense_init, sincos_pos_embed


class Predictor(nnx.Module):
    """Context tokens + mask tokens at target positions -> predicted target features.

    Each of the M target blocks is its own sequence [context | targets of that block]; the M
    sequences run as one batch. Target blocks are padded to a fixed length, and the padding sits
    at the end of each sequence, so `kv_lengths` alone keeps it out of attention.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        pred_dim: int,
        depth: int,
        heads: int,
        grid: tuple[int, int],
        attn_fn: AttentionFn,
        dtype=jnp.float32,
        residual_dtype=jnp.float32,
        remat: bool = False,
        scan: bool = False,
        fused_qkv: bool = False,
        activation=gelu,
        rngs: nnx.Rngs,
    ):
        self.grid = grid
        self.residual_dtype = residual_dtype
        self.embed = _linear(embed_dim, pred_dim, dtype, rngs)
        self.mask_token = nnx.Param(dense_init(rngs.params(), (pred_dim,)))
        self.blocks = BlockStack(
            depth,
            pred_dim,
            heads,
            4 * pred_dim,
            attn_fn,
            dtype=dtype,
            residual_dtype=residual_dtype,
            remat=remat,
            scan=scan,
            fused_qkv=fused_qkv,
            activation=activation,
            rngs=rngs,
        )
        self.norm = _layer_norm(pred_dim, residual_dtype, rngs)
        self.proj = _linear(pred_dim, embed_dim, dtype, rngs)

    def __call__(
        self,
        context: jax.Array,  # [B, Kc, D] encoder output at the context tokens
        context_idx: jax.Array,  # [B, Kc]
        target_idx: jax.Array,  # [B, M, Kt], padded
        target_len: jax.Array,  # [B, M] real tokens per target block
    ) -> jax.Array:  # [B, M, Kt, D]
        b, kc, _ = context.shape
        m, kt = target_idx.shape[1:]
        # As in the encoder: matmuls in bf16, the stream (positions, mask token) in residual_dtype.
        pos = jnp.asarray(
            sincos_pos_embed(self.embed.out_features, *self.grid), self.residual_dtype
        )
        x = self.embed(context) + pos[context_idx]
        x = jnp.repeat(x, m, axis=0)  # [B*M, Kc, Dp], block-major within each image
        queries = (
            self.mask_token[...].astype(self.residual_dtype) + pos[target_idx.reshape(b * m, kt)]
        )
        seq = jnp.concatenate([x, queries], axis=1)
        kv_lengths = kc + target_len.reshape(b * m).astype(jnp.int32)
        # Only the targets' rows are read out, so the last block computes those alone.
        out = self.proj(self.norm(self.blocks(seq, kv_lengths, first_query=kc)))
        return out.reshape(b, m, kt, -1)
