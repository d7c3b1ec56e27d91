"""I-JEPA's networks: build them from a model name or config, or load a trained encoder.

>>> m = jepa_jax.models.create("vit_h14", attention="cudnn")
>>> m.encoder, m.target_encoder, m.predictor, m.attention.name
>>> encoder, config = jepa_jax.models.load_encoder("runs/tiny", which="target")
"""

from jepa_jax.models.build import (
    IJEPA,
    build,
    create,
    for_targets,
    from_config,
    layer_counts,
    resolve_attention,
    resolve_fused_qkv,
    resolve_gelu,
)
from jepa_jax.models.fp8 import with_fp8_matmuls
from jepa_jax.models.predictor import Predictor
from jepa_jax.models.pretrained import load_encoder
from jepa_jax.models.vit import SIZES, VisionTransformer, ViTSize, encoder_size

__all__ = [
    "IJEPA",
    "SIZES",
    "Predictor",
    "VisionTransformer",
    "ViTSize",
    "build",
    "create",
    "encoder_size",
    "for_targets",
    "from_config",
    "layer_counts",
    "load_encoder",
    "resolve_attention",
    "resolve_fused_qkv",
    "resolve_gelu",
    "with_fp8_matmuls",
]
