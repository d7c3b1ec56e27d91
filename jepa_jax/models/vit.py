"""Vision Transformer encoder as in I-JEPA: linear patch embed, fixed 2-D sin-cos positions,
pre-norm blocks, final LayerNorm, no cls token.

Precision follows the release's bf16 autocast: every Linear casts its input to `dtype` (bf16)
and returns `dtype`, while the residual stream, positions and LayerNorms stay in
`residual_dtype` (float32 by default), so block outputs and the encoder output are float32.

Blocks are stored stacked (leading `depth` axis) and applied by `BlockStack`, either unrolled
(the default: fastest steps) or as one scanned block (fastest compile).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jepa_jax import sharding
from jepa_jax.attention import (
    CUDNN_SEQ_MULTIPLE,
    AttentionFn,
    pad_tokens,
    runs_cudnn,
    seq_multiple,
)
from jepa_jax.kernels.dense import tiling_for, width_tiles
from jepa_jax.models import fp8
from jepa_jax.models.activations import gelu, without_kernel
from jepa_jax.models.layers import Linear, linear_split

LN_EPS = 1e-6
# Every Linear (and the mask token) starts at N(0, 0.02), bias 0, as the release trained.
dense_init = nnx.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class ViTSize:
    width: int
    depth: int
    heads: int
    mlp_hidden: int


SIZES = {
    "tiny": ViTSize(192, 12, 3, 768),
    "small": ViTSize(384, 12, 6, 1536),
    "base": ViTSize(768, 12, 12, 3072),
    "large": ViTSize(1024, 24, 16, 4096),
    "huge": ViTSize(1280, 32, 16, 5120),
    "giant": ViTSize(1408, 40, 16, 6144),
}


def encoder_size(model) -> ViTSize:
    """The encoder that `model` (config.model, or a dict of its fields) describes: its variant's
    size, with `depth` blocks where that field is set (-1, or absent in older configs: the
    variant's own depth)."""
    size = SIZES[model["variant"]]
    depth = model.get("depth", -1)
    return size if depth == -1 else dataclasses.replace(size, depth=depth)


@functools.cache
def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """[grid_h * grid_w, dim] fixed positions: first half encodes the column, second the row."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1)[:, None] * freqs[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def _linear(din: int, dout: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return Linear(din, dout, kernel_init=dense_init, dtype=dtype, rngs=rngs)


def _layer_norm(dim: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm computing and returning `dtype` (the residual dtype: float32 as under autocast)."""
    return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention; the math itself is delegated to the seam's `attn_fn`."""

    def __init__(
        self, dim: int, heads: int, attn_fn: AttentionFn, *, dtype, fused_qkv, rngs: nnx.Rngs
    ):
        self.heads = heads
        self.attn_fn = attn_fn
        self.fused_qkv = fused_qkv and width_tiles(dim)  # XLA for a width it does not tile
        self.qkv = _linear(dim, 3 * dim, dtype, rngs)  # columns [q | k | v], heads contiguous
        self.proj = _linear(dim, dim, dtype, rngs)

    def __call__(
        self, x: jax.Array, kv_lengths: jax.Array | None = None, first_query: int = 0
    ) -> jax.Array:
        """Attention over x's rows; only rows from `first_query` on are returned (and
        projected), every row still serving as a key and a value."""
        b, t = x.shape[:2]
        multiple = self._kernel_multiple(b, t) if self.fused_qkv else 1
        (x,), kv_lengths = pad_tokens((x,), kv_lengths, multiple)
        q, k, v = linear_split(self.qkv, x, 3, self.fused_qkv)
        return self.proj(self.attend(q, k, v, kv_lengths)[:, first_query:t])

    def _kernel_multiple(self, batch: int, tokens: int) -> int:
        """The token multiple to pad x to before the q/k/v kernel, once: what the attention
        would pad q, k and v to apart after it; or, for cuDNN's calls that take any length,
        8 where only that lets the kernel tile batch x tokens rows."""
        multiple = seq_multiple(self.attn_fn, tokens)
        if multiple > 1 or not runs_cudnn(self.attn_fn):
            return multiple
        padded = -(-tokens // CUDNN_SEQ_MULTIPLE) * CUDNN_SEQ_MULTIPLE
        width = self.qkv.in_features
        rows = sharding.local_shape((batch,))  # each device's sequences, on a mesh
        if rows is None:
            return 1
        tiles = [tiling_for(rows[0] * n, width, width) is not None for n in (tokens, padded)]
        return CUDNN_SEQ_MULTIPLE if tiles == [False, True] else 1

    def attend(self, q, k, v, kv_lengths) -> jax.Array:
        """The attention of [b, t, d] q, k and v, split into heads and merged back: [b, t, d]."""
        b, t, d = q.shape
        q, k, v = (y.reshape(b, t, self.heads, d // self.heads) for y in (q, k, v))
        return self.attn_fn(q, k, v, kv_lengths=kv_lengths).reshape(b, t, d)


class Block(nnx.Module):
    """Pre-norm transformer block: x += attn(LN(x)); x += mlp(LN(x)).

    Matmuls run in `dtype`; the norms and both residual adds in `residual_dtype`, as autocast.
    `fused_qkv` writes q, k and v apart from inside their matmul (models.layers); `activation`
    is the MLP's GELU (one of `models.activations`); `fp8_matmuls` runs the four
    matmuls in FP8 instead (models.fp8: the target encoder's option).
    """

    def __init__(
        self,
        dim,
        heads,
        mlp_hidden,
        attn_fn,
        *,
        dtype,
        residual_dtype,
        fused_qkv=False,
        activation=gelu,
        rngs: nnx.Rngs,
    ):
        self.gelu = activation
        self.norm1 = _layer_norm(dim, residual_dtype, rngs)
        self.attn = Attention(dim, heads, attn_fn, dtype=dtype, fused_qkv=fused_qkv, rngs=rngs)
        self.norm2 = _layer_norm(dim, residual_dtype, rngs)
        self.fc1 = _linear(dim, mlp_hidden, dtype, rngs)
        self.fc2 = _linear(mlp_hidden, dim, dtype, rngs)
        self.fp8_matmuls = False  # models.fp8.with_fp8_matmuls sets it on the target copy

    def __call__(
        self, x: jax.Array, kv_lengths: jax.Array | None = None, first_query: int = 0
    ) -> jax.Array:
        """The block's output at x's rows from `first_query` on (the predictor's last block
        reads only its targets' rows; the FP8 target encoder keeps every row)."""
        if self.fp8_matmuls:
            if first_query:
                raise ValueError("FP8 blocks (the target encoder's) compute every row")
            # XLA's GELU: the exact one fuses with fc2's quantisation, the tanh one into fc1's
            # FP8 GEMM (the Pallas kernel was not measured here).
            return fp8.block_forward(self, x, kv_lengths, without_kernel(self.gelu))
        # The adds promote the bf16 branch outputs to x's dtype: the stream never rounds to bf16.
        x = x[:, first_query:] + self.attn(self.norm1(x), kv_lengths, first_query)
        return x + self.fc2(self.gelu(self.fc1(self.norm2(x))))


class BlockStack(nnx.Module):
    """`depth` blocks with stacked parameters, applied in order.

    `scan=True` compiles one block inside a loop (fastest compile; a second for a last block
    that computes only some rows, the predictor's); `scan=False` unrolls the
    loop, which on an H100 ran 1.2-1.3x faster with 25% less memory (BENCHMARKS.md): a scanned
    loop copies each layer's parameter slice and stacks residuals through dynamic updates.
    """

    def __init__(
        self,
        depth,
        dim,
        heads,
        mlp_hidden,
        attn_fn,
        *,
        dtype,
        residual_dtype,
        remat,
        scan,
        fused_qkv=False,
        activation=gelu,
        rngs: nnx.Rngs,
    ):
        self.depth = depth
        self.remat = remat
        self.scan = scan

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(
                dim,
                heads,
                mlp_hidden,
                attn_fn,
                dtype=dtype,
                residual_dtype=residual_dtype,
                fused_qkv=fused_qkv,
                activation=activation,
                rngs=rngs,
            )

        self.layers = make(rngs)

    def __call__(
        self, x: jax.Array, kv_lengths: jax.Array | None = None, first_query: int = 0
    ) -> jax.Array:
        """The blocks in order; the output at x's rows from `first_query` on, which the last
        block alone computes (every row still serves it as a key and a value)."""
        graphdef, stacked = nnx.split(self.layers)

        def apply(x, layer, first_query=0):
            def block(x, layer):
                # FSDP: each layer's parameters gathered whole, the rows kept split over the
                # batch axes (otherwise XLA gathered activations instead: many more bytes).
                x, layer = sharding.split_batch(x)[0], sharding.gathered(layer)
                return nnx.merge(graphdef, layer)(x, kv_lengths, first_query)

            if self.remat:
                block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
            return block(x, layer)

        def step(x, layer):
            return apply(x, layer), None

        def scan(x, layers, depth):
            return (
                jax.lax.scan(step, x, layers, unroll=1 if self.scan else depth)[0] if depth else x
            )

        if not first_query:
            return scan(x, stacked, self.depth)
        x = scan(x, jax.tree.map(lambda a: a[:-1], stacked), self.depth - 1)
        return apply(x, jax.tree.map(lambda a: a[-1], stacked), first_query)


def patch_grid(image_size: int, patch_size: int) -> tuple[int, int]:
    """The square grid of patches; one ValueError unless the image is a whole number of them."""
    if patch_size < 1 or image_size < 1 or image_size % patch_size:
        raise ValueError(
            f"config.model.image_size={image_size} is not a positive multiple of "
            f"config.model.patch_size={patch_size}"
        )
    return (image_size // patch_size,) * 2


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, H/p * W/p, p*p*C]: patches in row-major grid order, each flattened
    as (row, column, channel), the order of a conv kernel [p, p, C, D] reshaped to [p*p*C, D]."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class VisionTransformer(nnx.Module):
    """The I-JEPA encoder. `token_idx` [B, K] keeps only those patches (the context)."""

    def __init__(
        self,
        size: ViTSize,
        *,
        patch_size: int,
        image_size: int,
        attn_fn: AttentionFn,
        dtype=jnp.float32,
        residual_dtype=jnp.float32,
        remat: bool = False,
        scan: bool = False,
        fused_qkv: bool = False,
        activation=gelu,
        rngs: nnx.Rngs,
    ):
        self.size = size
        self.grid = patch_grid(image_size, patch_size)
        self.dtype = dtype
        self.residual_dtype = residual_dtype
        self.patch_size = patch_size
        # The release's stride-p conv, as the matmul it is: cuDNN ran the 3-channel conv as a
        # slow implicit GEMM on the H100 (BENCHMARKS.md). Its kernel is the conv's, flattened,
        # and starts as the release's did: the encoder's init gives the conv N(0, 0.02), bias 0.
        self.patch_embed = _linear(3 * patch_size * patch_size, size.width, dtype, rngs)
        self.blocks = BlockStack(
            size.depth,
            size.width,
            size.heads,
            size.mlp_hidden,
            attn_fn,
            dtype=dtype,
            residual_dtype=residual_dtype,
            remat=remat,
            scan=scan,
            fused_qkv=fused_qkv,
            activation=activation,
            rngs=rngs,
        )
        self.norm = _layer_norm(size.width, residual_dtype, rngs)

    def check_images(self, shape: tuple[int, ...]) -> None:
        """Raise one clear ValueError unless `shape` is [B, S, S, 3] at this encoder's size S:
        its positions are fixed to the grid it was trained on (a check on static shapes, so it
        costs nothing under jit)."""
        side = self.grid[0] * self.patch_size
        if len(shape) != 4 or tuple(shape[1:]) != (side, side, 3):
            raise ValueError(
                f"images of shape {tuple(shape)}: this encoder takes [batch, {side}, {side}, 3] "
                f"(RGB, {side} px: its positions are fixed to the {self.grid[0]}x{self.grid[1]} "
                f"patch grid of model.image_size={side}); resize or crop the images to {side}x"
                f"{side} first"
            )

    def __call__(self, images: jax.Array, token_idx: jax.Array | None = None) -> jax.Array:
        self.check_images(images.shape)
        if not isinstance(images, jax.core.Tracer):
            # Called eagerly (features from a loaded encoder): one compiled program per input
            # shape. Op by op, the layer loop compiled again on every call (1.5 s for ViT-Ti).
            return _compiled_forward(self, images, token_idx)
        patches = patchify(images.astype(self.dtype), self.patch_size)
        pos = jnp.asarray(sincos_pos_embed(self.size.width, *self.grid), self.residual_dtype)
        if token_idx is not None:  # embed only the kept patches
            patches = jnp.take_along_axis(patches, token_idx[..., None], axis=1)
            pos = pos[token_idx]
        # The bf16 embedding plus the residual-dtype positions starts the stream in that dtype.
        return self.norm(self.blocks(self.patch_embed(patches) + pos))


@nnx.jit
def _compiled_forward(encoder: VisionTransformer, images, token_idx) -> jax.Array:
    return encoder(images, token_idx)
