"""Build I-JEPA's three networks from a variant name and an attention choice, in one call.

>>> m = jepa_jax.models.create("vit_h14", attention="cudnn")
>>> m.encoder, m.target_encoder, m.predictor, m.attention.name
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
from flax import nnx

from jepa_jax import attention as attention_lib
from jepa_jax.models.predictor import Predictor
from jepa_jax.models.vit import SIZES, VisionTransformer, ViTSize

__all__ = [
    "IJEPA",
    "SIZES",
    "Predictor",
    "VisionTransformer",
    "create",
    "from_config",
    "parse",
    "resolve_attention",
]

_SHORT = {"t": "tiny", "s": "small", "b": "base", "l": "large", "h": "huge", "g": "giant"}
# Predictor depth of the released recipes, by encoder size.
PRED_DEPTH = {"tiny": 6, "small": 6, "base": 6, "large": 12, "huge": 12, "giant": 16}


@dataclasses.dataclass
class IJEPA:
    """The context encoder, its EMA target copy, the predictor, and the attention that runs."""

    encoder: VisionTransformer
    target_encoder: VisionTransformer
    predictor: Predictor
    attention: attention_lib.Choice

    def layer_counts(self) -> dict[str, int]:
        return layer_counts(self.encoder, self.predictor)


def layer_counts(encoder: VisionTransformer, predictor: Predictor) -> dict[str, int]:
    """Attention layers per network, for the startup line."""
    depth = encoder.blocks.depth
    return {"encoder": depth, "target encoder": depth, "predictor": predictor.blocks.depth}


def parse(variant: str) -> tuple[str, int, int]:
    """'vit_h14' -> ('huge', 14, 224); 'vit_h16_448' -> ('huge', 16, 448)."""
    match = re.fullmatch(r"vit_([a-z]+?)(\d+)(?:_(\d+))?", variant)
    size = match and _SHORT.get(match[1], match[1])
    if size not in SIZES:
        names = ", ".join(f"vit_{s[0]}16" for s in SIZES)
        raise ValueError(f"variant {variant!r}: expected vit_<size><patch>[_<image>], e.g. {names}")
    return size, int(match[2]), int(match[3] or 224)


def create(
    variant: str = "vit_b16",
    *,
    attention: str = "auto",
    image_size: int | None = None,
    pred_depth: int | None = None,
    pred_dim: int = 384,
    dtype: str = "bfloat16",
    remat: bool = False,
    scan_layers: bool = False,
    seed: int = 0,
) -> IJEPA:
    """Encoder, target encoder (an exact copy) and predictor, all calling one attention fn."""
    size_name, patch, default_image = parse(variant)
    return build(
        SIZES[size_name],
        patch_size=patch,
        image_size=image_size or default_image,
        pred_depth=pred_depth or PRED_DEPTH[size_name],
        pred_dim=pred_dim,
        attention=resolve_attention(SIZES[size_name], pred_dim, attention, dtype),
        dtype=dtype,
        remat=remat,
        scan_layers=scan_layers,
        seed=seed,
    )


def from_config(
    model_config, seed: int = 0, attention: attention_lib.Choice | None = None
) -> IJEPA:
    """Build from `config.model` (see configs/default.py); `attention` skips resolving again."""
    if model_config.variant not in SIZES:
        raise ValueError(
            f"config.model.variant={model_config.variant!r}: choose one of {sorted(SIZES)}"
        )
    return build(
        SIZES[model_config.variant],
        patch_size=model_config.patch_size,
        image_size=model_config.image_size,
        pred_depth=model_config.pred_depth,
        pred_dim=model_config.pred_dim,
        attention=attention
        or resolve_attention(
            SIZES[model_config.variant],
            model_config.pred_dim,
            model_config.attention,
            model_config.dtype,
        ),
        dtype=model_config.dtype,
        remat=model_config.remat,
        scan_layers=model_config.scan_layers,
        seed=seed,
    )


def resolve_attention(size: ViTSize, pred_dim: int, attention: str, dtype: str):
    """Which attention implementation runs for these networks (raises for impossible cudnn)."""
    if dtype not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"config.model.dtype={dtype!r}: choose bfloat16, float16 or float32")
    if pred_dim % size.heads:
        raise ValueError(f"config.model.pred_dim={pred_dim} is not divisible by {size.heads} heads")
    head_dims = (size.width // size.heads, pred_dim // size.heads)
    return attention_lib.resolve(attention, dtype=jnp.dtype(dtype), head_dims=head_dims)


def build(
    size: ViTSize,
    *,
    patch_size: int,
    image_size: int,
    pred_depth: int,
    pred_dim: int,
    attention: attention_lib.Choice,
    dtype: str,
    remat: bool,
    scan_layers: bool,
    seed: int,
) -> IJEPA:
    """The three networks, every attention layer calling `attention`'s implementation."""
    rngs = nnx.Rngs(seed)
    common = dict(
        attn_fn=attention.fn, dtype=jnp.dtype(dtype), remat=remat, scan=scan_layers, rngs=rngs
    )
    encoder = VisionTransformer(size, patch_size=patch_size, image_size=image_size, **common)
    predictor = Predictor(
        embed_dim=size.width,
        pred_dim=pred_dim,
        depth=pred_depth,
        heads=size.heads,
        grid=encoder.grid,
        **common,
    )
    return IJEPA(encoder, nnx.clone(encoder), predictor, attention)
