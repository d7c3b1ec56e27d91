"""The input side, one place: images from a source (`sources.py`) -> random resized crops ->
complete batches with their masks, this process's slice of each global batch.

The host produces {"images": uint8 [L, S, S, 3], "context_idx", "target_idx", "target_len",
"bad_images": int32 [L]} (`create_iterator`); the trainer places it on the mesh and
`normalize` turns the images into ImageNet-normalised float32 on device, so the host-to-device
copy is 4x smaller. bad_images is 1 where an undecodable file was replaced by a substitute.

`python -m jepa_jax.data --check PATH` lists the files of a folder that cannot be decoded.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from PIL import Image

from jepa_jax import images as images_lib
from jepa_jax import masks, sources
from jepa_jax.images import BadImageError  # noqa: F401  (the input side raises it, as before)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Each pipeline element is a whole batch (batching happens on the MapDataset so output does not
# depend on num_workers), so these threads build whole batches in parallel. Pillow releases the
# GIL while decoding and resizing, so threads help; the buffer is small because each element is
# a full batch (hundreds of MB at large batch sizes), not one image.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)


def crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: Sequence[float],
    ratio: Sequence[float],
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop box, torchvision's algorithm."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centred crop whose aspect ratio is within `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: Sequence[float],
    ratio: Sequence[float],
) -> np.ndarray:
    """Random crop (area in `scale`, aspect in `ratio`) resized bilinearly to size x size uint8."""
    top, left, h, w = crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    # Crop first, then resize: resampling with `box=` would blend pixels outside the box.
    crop = Image.fromarray(image).crop((left, top, left + w, top + h))
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))


def _crop_example(
    example: dict, rng: np.random.Generator, *, size: int, scale: tuple, ratio: tuple
) -> dict[str, np.ndarray]:
    crop = random_resized_crop(example["image"], size, rng, scale, ratio)
    return {"images": crop, "bad_images": example["bad_images"]}


def image_dataset(config: ml_collections.ConfigDict) -> grain.MapDataset:
    """The run's infinite stream of crops: element i is {"images": uint8 [S, S, 3], "bad_images"},
    a pure function of (config.seed, i). Epoch e is a fresh shuffle of the whole source."""
    source = sources.open_source(config)
    if len(source) < config.batch_size:
        if config.data.source == "builtin":
            where, fix = "config.data.builtin_size", "raise config.data.builtin_size"
        elif config.data.source == "digits":
            where, fix = "config.data.source='digits'", "train on a folder (source=folder)"
        else:
            where, fix = f"config.data.path={config.data.path!r}", "add images there"
        raise ValueError(
            f"config.batch_size={config.batch_size} is more than the {len(source)} images of "
            f"{where}; {fix} or lower config.batch_size"
        )
    # Seeds of process 0 as the per-process pipeline had them: single-process runs saved before
    # the global stream existed resume onto the very same batches.
    shuffle_seed, crop_seed = (
        int(s) for s in np.random.SeedSequence([config.seed, 0]).generate_state(2)
    )
    crop = functools.partial(
        _crop_example,
        size=int(config.model.image_size),
        scale=tuple(float(s) for s in config.data.crop_scale),
        ratio=tuple(float(r) for r in config.data.crop_ratio),
    )
    # repeat() reseeds shuffle each epoch; random_map's rng depends on the global element index,
    # so crops differ per epoch too, and every element is reproducible from its index alone.
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
    return ds.random_map(crop, seed=crop_seed)


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of every global batch that process `process_index` reads."""
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


class _AddMasks:
    """Adds this process's rows of step `first_step + index`'s masks to a batch of crops."""

    def __init__(self, spec: masks.MaskSpec, seed: int, first_step: int, batch: int, rows: slice):
        self.spec, self.seed, self.first_step = spec, seed, first_step
        self.batch, self.rows = batch, rows

    def __call__(self, index: int, crops: dict) -> dict:
        step = self.first_step + index
        return {**crops, **masks.step_masks(self.spec, self.seed, step, self.batch, self.rows)}


def synthetic_batch(config, spec: masks.MaskSpec, images: np.ndarray, step: int) -> dict:
    """A complete batch of step `step` on given images (this process's rows): the bench's and
    tests' way to step without decoding."""
    rows = process_rows(config.batch_size, jax.process_index(), jax.process_count())
    step_masks = masks.step_masks(spec, config.seed, step, config.batch_size, rows)
    return {"images": images, "bad_images": np.zeros(len(images), np.int32), **step_masks}


def create_dataset(
    config: ml_collections.ConfigDict,
    *,
    first_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """This process's complete batches for steps first_step, first_step + 1, ...:
    {"images": uint8 [L, S, S, 3], "context_idx", "target_idx", "target_len", "bad_images"}.

    Global batch k is crops k*B .. k*B + B - 1 of `image_dataset` plus the masks of step k, a
    function of (seed, k) alone; process p reads rows p*L .. p*L + L - 1 of it (L = B / P). So
    any number of processes or workers computes the same run, and resuming needs only the step.
    """
    if config.batch_size < 1 or config.batch_size % process_count:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be a positive multiple of the number of "
            f"processes ({process_count}); set config.batch_size to a multiple of {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    local = config.batch_size // process_count
    rows = process_rows(config.batch_size, process_index, process_count)
    # Batch on the MapDataset: batch k is then the same however many workers build it. Local
    # batch j holds crops j*L .. j*L + L - 1, so global batch k is local batches k*P .. k*P+P-1.
    ds = image_dataset(config).batch(local, drop_remainder=True)
    ds = ds[first_step * process_count + process_index :: process_count]
    add_masks = _AddMasks(masks.mask_spec(config), config.seed, first_step, config.batch_size, rows)
    it_ds = ds.map_with_index(add_masks).to_iter_dataset(_READ_OPTIONS)
    if config.data.num_workers > 0:
        # grain's worker start-up reads an absl flag and raises UnparsedFlagAccessError when the
        # caller never parsed flags (a plain script, a notebook, pytest; google/grain#1355). Under
        # absl.app flags are already parsed and this does nothing.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
    return it_ds


def create_iterator(
    config: ml_collections.ConfigDict,
    *,
    first_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Iterator over `create_dataset`'s batches, starting at `first_step`."""
    return iter(
        create_dataset(
            config,
            first_step=first_step,
            process_index=process_index,
            process_count=process_count,
        )
    )


def normalize(images: jax.Array) -> jax.Array:
    """uint8 NHWC -> float32 (x/255 - mean)/std; meant to run on device inside the step."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
    return (images.astype(jnp.float32) - mean) / std


if __name__ == "__main__":
    sys.exit(images_lib.main())
