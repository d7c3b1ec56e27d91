"""A trained encoder, ready to use: `load_encoder(workdir)` -> (encoder, config)."""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from jepa_jax import checkpoint
from jepa_jax.models.build import from_config, resolve_attention, resolve_fused_qkv, resolve_gelu
from jepa_jax.models.vit import encoder_size


def load_encoder(
    path: str,
    which: str = "target",
    *,
    attention: str = "auto",
    fused_qkv: str = "auto",
    gelu_kernel: str = "auto",
) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """(encoder, config) from a workdir or step folder: `encoder(data.normalize(images))` maps
    images [B, S, S, 3] (RGB, S = config.model.image_size) to features [B, N, D], always float32
    (the residual stream and final norm run in float32 whatever the run trained with; matmuls
    keep the run's compute dtype). Images of another size raise one ValueError saying the size.

    `which`: "target" (the EMA encoder, the one I-JEPA evaluates) or "context" (the online one).
    Only that encoder's parameters are read, onto the first local device. A call compiles once
    per input shape. `attention`, `fused_qkv` and `gelu_kernel` (README: Attention, GPU) pick
    what runs here, whatever the run used: parameters never depend on them. The GELU's formula
    is the run's (`config.model.gelu`); the kernel serves the exact one only.
    """
    step_dir, config = checkpoint.read_config(path)
    m = ml_collections.ConfigDict(config.model.to_dict())
    m.residual_dtype = "float32"  # float32 features whatever the run trained with
    size = encoder_size(m)
    choice = resolve_attention(size, m.pred_dim, attention, m.dtype)
    fused = resolve_fused_qkv(size, m.pred_dim, fused_qkv, m.dtype)
    gelu = resolve_gelu(m, gelu_kernel)
    graphdef, abstract = nnx.split(
        nnx.eval_shape(
            lambda: from_config(m, attention=choice, fused_qkv=fused, gelu_kernel=gelu).encoder
        )
    )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        nnx.to_pure_dict(abstract),
    )
    params = checkpoint.read_encoder_params(step_dir, which, shapes)
    name = "target (EMA)" if which == "target" else "context"
    print(
        f"Loaded the {name} encoder ({m.variant}, patch {m.patch_size}, {m.image_size}px, "
        f"attention {choice.name}) from {step_dir}",
        flush=True,
    )
    return nnx.merge(graphdef, params), config
