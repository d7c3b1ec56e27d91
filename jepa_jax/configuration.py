"""Startup validation of a whole config, once: one clear message per bad field, before anything
runs. Each rule lives here, except the mask fields' and the patch grid's, which `masks.mask_spec`
and `models.vit.patch_grid` own and this calls. Modules downstream trust a validated config."""

from __future__ import annotations

from jepa_jax import kernels, masks
from jepa_jax.attention import IMPLEMENTATIONS
from jepa_jax.evaluate.features import FEATURES
from jepa_jax.models import fp8
from jepa_jax.models.activations import gelu_formula
from jepa_jax.models.vit import SIZES, encoder_size, patch_grid
from jepa_jax.sources import ON_BAD_IMAGE, SOURCES
from jepa_jax.totals import ON_NAN

DTYPES = ("bfloat16", "float16", "float32")


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"config.{field}={value!r} is invalid: {allowed}")


def validate(config) -> None:
    """Raise ValueError naming the first invalid field and what it accepts."""
    m, o = config.model, config.optim
    _require(m.variant in SIZES, "model.variant", m.variant, f"choose one of {sorted(SIZES)}")
    _require(
        m.attention in IMPLEMENTATIONS,
        "model.attention",
        m.attention,
        f"choose one of {list(IMPLEMENTATIONS)}",
    )
    for field in ("fused_qkv", "short_attention_backward", "gelu_kernel"):
        value = kernels.setting(m, field)
        _require(
            value in kernels.SETTINGS,
            f"model.{field}",
            value,
            f"choose one of {list(kernels.SETTINGS)}",
        )
    _require(
        gelu_formula(m) in kernels.GELU_FORMULAS,
        "model.gelu",
        gelu_formula(m),
        f"choose one of {list(kernels.GELU_FORMULAS)}",
    )
    fp8_setting = fp8.setting(m)
    _require(
        fp8_setting in fp8.SETTINGS,
        "model.fp8",
        fp8_setting,
        f"choose one of {list(fp8.SETTINGS)}",
    )
    for field in ("dtype", "residual_dtype"):
        _require(m[field] in DTYPES, f"model.{field}", m[field], f"choose one of {list(DTYPES)}")
    depth = m.get("depth", -1)  # absent in configs saved before the field
    _require(depth == -1 or depth >= 1, "model.depth", depth, "-1 (the variant's) or >= 1")
    patch_grid(m.image_size, m.patch_size)
    _require(m.pred_depth >= 1, "model.pred_depth", m.pred_depth, "must be >= 1")
    heads = SIZES[m.variant].heads
    _require(
        m.pred_dim > 0 and m.pred_dim % heads == 0,
        "model.pred_dim",
        m.pred_dim,
        f"must be a positive multiple of the {heads} heads of {m.variant}",
    )
    on_nan = config.get("on_nan", "stop")
    _require(on_nan in ON_NAN, "on_nan", on_nan, f"choose one of {list(ON_NAN)}")
    for field in ("batch_size", "total_steps", "log_every", "keep_checkpoints"):
        _require(config[field] >= 1, field, config[field], "must be >= 1")
    limit = config.get("max_nonfinite_steps", 3)
    _require(limit >= 1, "max_nonfinite_steps", limit, "must be >= 1")
    _require(
        config.checkpoint_every >= 0,
        "checkpoint_every",
        config.checkpoint_every,
        "must be >= 0 (0: only at the end)",
    )
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    for field in ("lr", "start_lr", "final_lr"):
        _require(o[field] >= 0, f"optim.{field}", o[field], "learning rates must be >= 0")
    _require(all(0 <= v <= 1 for v in o.ema), "optim.ema", o.ema, "momenta must lie in [0, 1]")
    _require(min(o.weight_decay) >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    d = config.data
    _require(d.source in SOURCES, "data.source", d.source, f"choose one of {list(SOURCES)}")
    on_bad = d.get("on_bad_image", "skip")
    _require(
        on_bad in ON_BAD_IMAGE,
        "data.on_bad_image",
        on_bad,
        f"choose one of {list(ON_BAD_IMAGE)} (skip: train on the next readable image, counted)",
    )
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0 (0: in-process)")
    for field in ("crop_scale", "crop_ratio"):
        lo, hi = d[field]
        _require(0 < lo <= hi, f"data.{field}", d[field], "a pair (lo, hi) with 0 < lo <= hi")
    e = config.get("eval")  # absent in configs saved before periodic evaluation
    if e is not None:
        _require(e.every >= 0, "eval.every", e.every, "steps between evaluations, >= 0 (0: off)")
        _require(e.features in FEATURES, "eval.features", e.features, f"choose one of {FEATURES}")
        _require(
            e.features != "last4" or encoder_size(m).depth >= 4,
            "eval.features",
            e.features,
            f"last4 reads the last 4 blocks; this encoder has {encoder_size(m).depth}: use avgpool",
        )
        _require(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be >= 1")
    masks.mask_spec(config)  # the mask fields' own checks
