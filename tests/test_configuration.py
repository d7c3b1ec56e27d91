"""Every preset is valid; a bad value stops with a message naming its field."""

import pytest

from configs.default import PRESETS, get_config
from jepa_jax.configuration import validate


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_valid(preset):
    validate(get_config(preset))


@pytest.mark.parametrize(
    "field,value",
    [
        ("model.variant", "enormous"),
        ("model.depth", 0),
        ("model.attention", "flash"),
        ("model.fused_qkv", "yes"),
        ("model.dtype", "int8"),
        ("model.residual_dtype", "float8"),
        ("model.image_size", 100),
        ("model.pred_depth", 0),
        ("model.pred_dim", 100),
        ("batch_size", 0),
        ("total_steps", 0),
        ("log_every", 0),
        ("keep_checkpoints", 0),
        ("checkpoint_every", -1),
        ("optim.warmup_steps", -1),
        ("optim.start_lr", -1e-3),
        ("optim.ema", (0.9, 1.5)),
        ("optim.weight_decay", (-0.1, 0.4)),
        ("data.source", "imagenet"),
        ("data.on_bad_image", "ignore"),
        ("data.num_workers", -1),
        ("data.crop_scale", (0.5, 0.3)),
        ("mask.num_targets", 0),
        ("eval.every", -1),
        ("eval.features", "cls"),
        ("eval.batch_size", 0),
    ],
)
def test_bad_value_names_its_field(field, value):
    config = get_config("tiny")
    *groups, leaf = field.split(".")
    node = config
    for g in groups:
        node = node[g]
    node[leaf] = value
    with pytest.raises(ValueError, match=rf"config\.{field}="):
        validate(config)


def test_last4_features_need_four_blocks():
    config = get_config("digits")
    config.eval.features = "last4"
    validate(config)  # digits has 4 blocks
    config.model.depth = 3
    with pytest.raises(ValueError, match=r"config\.eval\.features='last4'.*has 3: use avgpool"):
        validate(config)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_config("huge")


# The release's configs (IJEPA_REFERENCE.md table and its yaml files): model size, patch, crop,
# predictor depth, per-GPU batch, epochs, warmup epochs, images per epoch.
RELEASED = {
    "vit_h14": ("huge", 14, 224, 12, 128, 300, 40, 1_281_167),  # in1k_vith14_ep300
    "vit_h16_448": ("huge", 16, 448, 12, 16, 300, 40, 1_281_167),  # in1k_vith16-448_ep300
    "vit_h14_in22k": ("huge", 14, 224, 12, 32, 66, 3, 14_197_122),  # in22k_vith14_ep66
    "vit_g16": ("giant", 16, 224, 16, 16, 44, 3, 14_197_122),  # in22k_vitg16_ep44
}


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_released_presets_match_the_release(preset):
    size, patch, crop, pred_depth, per_gpu, epochs, warmup, images = RELEASED[preset]
    c = get_config(preset)
    m, o = c.model, c.optim
    assert (m.variant, m.patch_size, m.image_size, m.pred_depth, m.pred_dim) == (
        size,
        patch,
        crop,
        pred_depth,
        384,
    )
    assert c.batch_size == 2048 and c.mask.trim_batch == per_gpu
    steps_per_epoch = images // 2048
    assert c.total_steps == epochs * steps_per_epoch
    assert o.warmup_steps == warmup * steps_per_epoch
    assert (o.lr, o.start_lr, o.final_lr) == (1e-3, 2e-4, 1e-6)
    assert tuple(o.weight_decay) == (0.04, 0.4) and tuple(o.ema) == (0.996, 1.0)
    assert (o.b1, o.b2, o.eps) == (0.9, 0.999, 1e-8)
    assert tuple(c.data.crop_scale) == (0.3, 1.0)
    mk = c.mask
    assert (mk.num_targets, tuple(mk.target_scale), tuple(mk.target_aspect)) == (
        4,
        (0.15, 0.2),
        (0.75, 1.5),
    )
    assert tuple(mk.context_scale) == (0.85, 1.0) and mk.min_keep == 10
    assert m.dtype == "bfloat16" and m.residual_dtype == "float32"
