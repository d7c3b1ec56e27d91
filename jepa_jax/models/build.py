"""Build I-JEPA's three networks from a model name (or `config.model`) and an attention choice."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jepa_jax import attention as attention_lib
from jepa_jax import kernels, presets
from jepa_jax.models import activations, fp8
from jepa_jax.models.predictor import Predictor
from jepa_jax.models.vit import SIZES, VisionTransformer, ViTSize, encoder_size


@dataclasses.dataclass
class IJEPA:
    """The context encoder, its EMA target copy, the predictor, the attention that runs, and
    whether the q/k/v and GELU kernels run."""

    encoder: VisionTransformer
    target_encoder: VisionTransformer
    predictor: Predictor
    attention: attention_lib.Choice
    fused_qkv: kernels.FusedQKV
    gelu_kernel: kernels.GeluKernel

    def layer_counts(self) -> dict[str, int]:
        return layer_counts(self.encoder, self.predictor)


def for_targets(encoder: VisionTransformer, fp8_setting: str) -> VisionTransformer:
    """A copy of `encoder` (same parameters) as the EMA target encoder runs it: never
    differentiated, so its cuDNN attention takes sequences unpadded, and with `fp8_setting`
    "target" (`config.model.fp8`) its blocks multiply in FP8."""
    copy = fp8.with_fp8_matmuls(encoder) if fp8_setting == "target" else nnx.clone(encoder)
    attn = copy.blocks.layers.attn
    attn.attn_fn = attention_lib.forward_only(attn.attn_fn)
    return copy


def layer_counts(encoder: VisionTransformer, predictor: Predictor) -> dict[str, int]:
    """Attention layers per network, for the startup line."""
    depth = encoder.blocks.depth
    return {"encoder": depth, "target encoder": depth, "predictor": predictor.blocks.depth}


def create(
    name: str = "vit_b16",
    *,
    attention: str = "auto",
    image_size: int | None = None,
    pred_depth: int | None = None,
    pred_dim: int = 384,
    dtype: str = "bfloat16",
    residual_dtype: str = "float32",
    remat: bool = False,
    scan_layers: bool = False,
    fused_qkv: str = "auto",
    short_attention_backward: str = "auto",
    gelu_kernel: str = "auto",
    gelu: str = "exact",
    seed: int = 0,
) -> IJEPA:
    """Encoder, target encoder (an exact copy) and predictor of the named model (a key of
    `presets.MODELS`: vit_t16 ... vit_g16), all calling one attention fn.

    `dtype` is the matmul and attention dtype; `residual_dtype` that of the residual stream,
    LayerNorms and outputs (float32: the release's autocast; bfloat16: faster, less faithful).
    `gelu` is the MLPs' formula, exact (the release's) or tanh (faster, less faithful).
    """
    spec = presets.model_spec(name)
    size = SIZES[spec.size]
    return build(
        size,
        patch_size=spec.patch_size,
        image_size=image_size or spec.image_size,
        pred_depth=pred_depth or spec.pred_depth,
        pred_dim=pred_dim,
        attention=resolve_attention(
            size,
            pred_dim,
            attention,
            dtype,
            short_backward=short_attention_backward,
        ),
        fused_qkv=resolve_fused_qkv(size, pred_dim, fused_qkv, dtype),
        gelu_kernel=kernels.resolve_gelu(gelu_kernel, gelu),
        dtype=dtype,
        residual_dtype=residual_dtype,
        remat=remat,
        scan_layers=scan_layers,
        seed=seed,
    )


def from_config(
    model_config,
    seed: int = 0,
    attention: attention_lib.Choice | None = None,
    fused_qkv: kernels.FusedQKV | None = None,
    gelu_kernel: kernels.GeluKernel | None = None,
) -> IJEPA:
    """Build from a validated `config.model` (configs/default.py, configuration.validate);
    `attention`, `fused_qkv` and `gelu_kernel` skip resolving again."""
    size = encoder_size(model_config)
    formula = activations.gelu_formula(model_config)
    if gelu_kernel and gelu_kernel.formula != formula:
        raise ValueError(
            f"gelu_kernel was resolved for gelu={gelu_kernel.formula!r}, but config.model.gelu="
            f"{formula!r}: resolve it with models.resolve_gelu(config.model)"
        )
    return build(
        size,
        patch_size=model_config.patch_size,
        image_size=model_config.image_size,
        pred_depth=model_config.pred_depth,
        pred_dim=model_config.pred_dim,
        attention=attention
        or resolve_attention(
            size,
            model_config.pred_dim,
            model_config.attention,
            model_config.dtype,
            short_backward=kernels.setting(model_config, "short_attention_backward"),
        ),
        fused_qkv=fused_qkv
        or resolve_fused_qkv(
            size,
            model_config.pred_dim,
            kernels.setting(model_config, "fused_qkv"),
            model_config.dtype,
        ),
        gelu_kernel=gelu_kernel or resolve_gelu(model_config),
        dtype=model_config.dtype,
        residual_dtype=model_config.get("residual_dtype", "float32"),  # absent in older configs
        remat=model_config.remat,
        scan_layers=model_config.scan_layers,
        seed=seed,
    )


def resolve_attention(
    size: ViTSize,
    pred_dim: int,
    attention: str,
    dtype: str,
    *,
    short_backward: str = "off",
):
    """Which attention implementation runs for these networks, and whether its backward of short
    sequences runs in the kernel (raises for an impossible cudnn or `on`)."""
    head_dims = (size.width // size.heads, pred_dim // size.heads)
    choice = attention_lib.resolve(attention, dtype=jnp.dtype(dtype), head_dims=head_dims)
    return kernels.resolve_short_backward(short_backward, choice)


def resolve_gelu(model_config, setting: str | None = None) -> kernels.GeluKernel:
    """Which GELU runs for `config.model`: its formula (`gelu`), and the kernel per `setting`
    (by default its `gelu_kernel`; raises for an impossible `on`)."""
    setting = setting or kernels.setting(model_config, "gelu_kernel")
    return kernels.resolve_gelu(setting, activations.gelu_formula(model_config))


def resolve_fused_qkv(size: ViTSize, pred_dim: int, setting: str, dtype: str) -> kernels.FusedQKV:
    """Whether the q/k/v kernel runs for these networks (raises for an impossible `on`)."""
    widths = {"encoders": size.width, "predictor": pred_dim}
    return kernels.resolve(setting, dtype=dtype, widths=widths)


def build(
    size: ViTSize,
    *,
    patch_size: int,
    image_size: int,
    pred_depth: int,
    pred_dim: int,
    attention: attention_lib.Choice,
    fused_qkv: kernels.FusedQKV,
    gelu_kernel: kernels.GeluKernel,
    dtype: str,
    residual_dtype: str,
    remat: bool,
    scan_layers: bool,
    seed: int,
) -> IJEPA:
    """The three networks, every attention layer calling `attention`'s implementation."""
    shape = _Networks(
        size,
        patch_size,
        image_size,
        pred_depth,
        pred_dim,
        attention.fn,
        jnp.dtype(dtype),
        jnp.dtype(residual_dtype),
        remat,
        scan_layers,
        fused_qkv.on,
        activations.for_mlp(gelu_kernel),
    )
    encoder, predictor = _init(jax.random.key(seed), shape)
    return IJEPA(encoder, nnx.clone(encoder), predictor, attention, fused_qkv, gelu_kernel)


@dataclasses.dataclass(frozen=True)
class _Networks:
    """Everything but the seed that fixes the networks: the static argument of `_init`."""

    size: ViTSize
    patch_size: int
    image_size: int
    pred_depth: int
    pred_dim: int
    attn_fn: attention_lib.AttentionFn
    dtype: jnp.dtype
    residual_dtype: jnp.dtype
    remat: bool
    scan: bool
    fused_qkv: bool
    activation: Callable[[jax.Array], jax.Array]


# Initialised as one compiled program, cached per shape with the seed an argument (run eagerly,
# each init op compiled and ran alone: ViT-Ti on a CPU took 4.6 s).
@functools.partial(nnx.jit, static_argnums=1)
def _init(key: jax.Array, n: _Networks) -> tuple[VisionTransformer, Predictor]:
    common = dict(
        attn_fn=n.attn_fn,
        dtype=n.dtype,
        residual_dtype=n.residual_dtype,
        remat=n.remat,
        scan=n.scan,
        fused_qkv=n.fused_qkv,
        activation=n.activation,
        rngs=nnx.Rngs(key),
    )
    encoder = VisionTransformer(n.size, patch_size=n.patch_size, image_size=n.image_size, **common)
    predictor = Predictor(
        embed_dim=n.size.width,
        pred_dim=n.pred_dim,
        depth=n.pred_depth,
        heads=n.size.heads,
        grid=encoder.grid,
        **common,
    )
    return encoder, predictor
