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
        ("model.attention", "flash"),
        ("model.dtype", "int8"),
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


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_config("huge")
