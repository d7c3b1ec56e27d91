"""The one table of named models and training recipes.

`MODELS` names an architecture (`models.create("vit_h14")`); `PRESETS` names a training recipe
built on one of them (`configs/default.py:vit_h14`). Both live in the package so an installed
jepa_jax has them. Recipe values are the official release's configs (IJEPA_REFERENCE.md);
ViT-B/16 and ViT-L/16 have no released config and follow the paper's 600-epoch runs.
"""

from __future__ import annotations

import dataclasses

IMAGENET_1K_IMAGES = 1_281_167
# The release ships no ImageNet-22K loader; this is the full ImageNet-22K (fall 2011) size.
IMAGENET_22K_IMAGES = 14_197_122


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    size: str  # encoder size, a key of models.vit.SIZES (config.model.variant)
    patch_size: int
    image_size: int
    pred_depth: int


MODELS = {
    "vit_t16": ModelSpec("tiny", 16, 224, 6),
    "vit_s16": ModelSpec("small", 16, 224, 6),
    "vit_b16": ModelSpec("base", 16, 224, 6),
    "vit_l16": ModelSpec("large", 16, 224, 12),
    "vit_h14": ModelSpec("huge", 14, 224, 12),
    "vit_h16_448": ModelSpec("huge", 16, 448, 12),
    "vit_g16": ModelSpec("giant", 16, 224, 16),
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: str  # a key of MODELS
    batch_size: int  # global batch
    epochs: int
    warmup_epochs: int
    dataset_images: int  # images per epoch: sets total_steps and the warmup length
    # The release's per-GPU batch: it trims every mask to the minimum over that batch, so the
    # fixed context length here is derived as the mean of that minimum (config.mask.trim_batch).
    trim_batch: int


PRESETS = {
    # tiny: seconds on a laptop CPU; configs/default.py shrinks it further (image 96, 30 steps).
    "tiny": Recipe("vit_t16", 8, 1, 0, 64, 128),
    # digits: the CPU demo that pretraining works, 12 epochs of the 4,000 built-in digits
    # (configs/default.py shrinks the encoder to 4 blocks; README: Did pretraining work?).
    "digits": Recipe("vit_t16", 32, 12, 1, 4000, 128),
    "vit_b16": Recipe("vit_b16", 2048, 600, 40, IMAGENET_1K_IMAGES, 128),
    "vit_l16": Recipe("vit_l16", 2048, 600, 40, IMAGENET_1K_IMAGES, 128),
    "vit_h14": Recipe("vit_h14", 2048, 300, 40, IMAGENET_1K_IMAGES, 128),  # in1k_vith14_ep300
    "vit_h16_448": Recipe("vit_h16_448", 2048, 300, 40, IMAGENET_1K_IMAGES, 16),
    "vit_h14_in22k": Recipe("vit_h14", 2048, 66, 3, IMAGENET_22K_IMAGES, 32),  # in22k_vith14_ep66
    "vit_g16": Recipe("vit_g16", 2048, 44, 3, IMAGENET_22K_IMAGES, 16),  # in22k_vitg16_ep44
}


def model_spec(name: str) -> ModelSpec:
    """The named architecture; ValueError listing the names otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]
