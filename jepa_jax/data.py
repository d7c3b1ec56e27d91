"""The input side, one place: image sources -> random resized crops -> complete batches with
their masks, this process's slice of each global batch.

The host produces {"images": uint8 [L, S, S, 3], "context_idx", "target_idx", "target_len",
"bad_images": int32 [L]} (`create_iterator`); the trainer places it on the mesh and
`normalize` turns the images into ImageNet-normalised float32 on device, so the host-to-device
copy is 4x smaller. bad_images is 1 where an undecodable file was replaced by a substitute.

`python -m jepa_jax.data --check PATH` lists the files of a folder that cannot be decoded.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import threading
from collections.abc import Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from PIL import Image, ImageDraw

from jepa_jax import images as images_lib
from jepa_jax import masks
from jepa_jax.images import IMAGE_EXTENSIONS, BadImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCES = ("builtin", "folder")
ON_BAD_IMAGE = ("skip", "stop")
MAX_NAMED_BAD_IMAGES = 10  # per process: the log names this many bad files, then stays quiet
_LOG = logging.getLogger(__name__)

# Each pipeline element is a whole batch (batching happens on the MapDataset so output does not
# depend on num_workers), so these threads build whole batches in parallel. Pillow releases the
# GIL while decoding and resizing, so threads help; the buffer is small because each element is
# a full batch (hundreds of MB at large batch sizes), not one image.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)


class BuiltinSource:
    """Procedural images, image i a pure function of i: a dataset with no download and no files."""

    def __init__(self, size: int, side: int = 256):
        self.size = size
        self.side = side

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.size:
            raise IndexError(f"builtin image {index} out of range [0, {self.size})")
        return _procedural_image(int(index), self.side)

    def __repr__(self) -> str:
        return f"BuiltinSource(size={self.size}, side={self.side})"


def _procedural_image(index: int, side: int) -> np.ndarray:
    """A smooth colour field plus a few shapes: spatial structure for I-JEPA to predict, < 2 ms."""
    rng = np.random.default_rng([0x1EBA, index])
    # The colour field is smooth, so compute it on a coarse grid and let Pillow upsample it:
    # full-resolution float maths would cost several ms per image.
    coords = np.linspace(0.0, 1.0, 32, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    # Linear gradient between two colours along a random direction, bent by a slow wave.
    t = coords[None, :] * np.cos(angle) + coords[:, None] * np.sin(angle)
    t = (t - t.min()) / (t.max() - t.min())
    freq, phase, tilt = rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi), rng.uniform(-1, 1)
    wave = np.sin(2 * np.pi * freq * (coords[None, :] + tilt * coords[:, None]) + phase)
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    tint = rng.uniform(-40, 40, 3).astype(np.float32)
    field = c0 + t[..., None] * (c1 - c0) + wave[..., None] * tint
    coarse = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    img = coarse.resize((side, side), Image.Resampling.BILINEAR)

    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        kind = int(rng.integers(3))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(-0.1, 0.8, 2) * side
        w, h = rng.uniform(0.1, 0.5, 2) * side
        if kind == 0:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=color)
        elif kind == 1:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=color)
        else:  # a patch of parallel stripes
            step = int(rng.integers(6, 20))
            for k in range(0, int(w), step):
                draw.line((x0 + k, y0, x0 + k + h * 0.3, y0 + h), fill=color, width=step // 2)
    return np.asarray(img)


class FolderSource:
    """Images under a folder (root/class/*.JPEG or flat), decoded with Pillow to RGB uint8.

    An undecodable file raises BadImageError; `SubstituteBadImages` turns that into a substitute.
    """

    def __init__(self, root: str):
        self.root = root
        paths = images_lib.list_images(root)
        # Fixed-width bytes pickle compactly: every grain worker gets a copy of this list.
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self._paths[index]))

    def __getitem__(self, index: int) -> np.ndarray:
        return images_lib.decode_image(self.path(index))

    def __repr__(self) -> str:
        return f"FolderSource(root={self.root!r}, images={len(self)})"


class SubstituteBadImages:
    """Element i is {"image", "bad_images"}: image i, or if it cannot be decoded the next readable
    one in source order (wrapping), with bad_images=1.

    The substitute is a function of i alone, so batches stay the same for any number of workers
    or processes and across resume. on_bad="stop" raises instead. Each process names its first
    MAX_NAMED_BAD_IMAGES bad files in the log, once each.
    """

    def __init__(self, source, on_bad: str = "skip"):
        self.source = source
        self.on_bad = on_bad
        self._init_log_state()

    def _init_log_state(self) -> None:
        self._lock = threading.Lock()  # grain reads with several threads
        self._named: set[str] = set()

    def __getstate__(self) -> dict:  # grain pickles the source into worker processes
        return {"source": self.source, "on_bad": self.on_bad}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_log_state()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        size = len(self.source)
        for offset in range(size):
            try:
                image = self.source[(index + offset) % size]
            except BadImageError as e:
                if self.on_bad == "stop":
                    raise BadImageError(
                        e.path,
                        e.reason,
                        "remove or replace the file (python -m jepa_jax.data --check DIR lists "
                        "them all), or set config.data.on_bad_image=skip to train on substitutes",
                    ) from None
                self._name_once(e)
                continue
            return {"image": image, "bad_images": np.int32(offset > 0)}
        raise ValueError(
            f"none of the {size} images of {self.source!r} can be decoded; "
            "check config.data.path with python -m jepa_jax.data --check PATH"
        )

    def _name_once(self, error: BadImageError) -> None:
        with self._lock:
            if error.path in self._named or len(self._named) > MAX_NAMED_BAD_IMAGES:
                return
            self._named.add(error.path)
            last = len(self._named) > MAX_NAMED_BAD_IMAGES
        if last:
            _LOG.warning(
                "more undecodable images are substituted but not named here (batches count them "
                "in 'bad_images'); python -m jepa_jax.data --check PATH lists them all"
            )
        else:
            _LOG.warning(
                "bad image %s (%s): training on the next readable one instead "
                "(config.data.on_bad_image=skip)",
                error.path,
                error.reason,
            )

    def __repr__(self) -> str:
        return f"SubstituteBadImages({self.source!r}, on_bad={self.on_bad!r})"


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


def _make_source(config: ml_collections.ConfigDict) -> SubstituteBadImages:
    """The configured random-access source; user mistakes raise one message saying the fix."""
    on_bad = config.data.get("on_bad_image", "skip")  # configs written before the field: skip
    return SubstituteBadImages(_open_source(config), on_bad)


def _open_source(config: ml_collections.ConfigDict) -> BuiltinSource | FolderSource:
    source = config.data.source
    if source == "builtin":
        if config.data.path:
            raise ValueError(
                f"config.data.path={config.data.path!r} is set but config.data.source='builtin' "
                "trains on procedural images and ignores it; set --config.data.source=folder to "
                "train on that folder, or --config.data.path='' for the built-in images"
            )
        return BuiltinSource(int(config.data.builtin_size))
    path = config.data.path
    if not path:
        raise ValueError(
            "config.data.source='folder' needs config.data.path; set --config.data.path to an "
            "image folder (ImageNet layout root/class/*.JPEG, or a flat folder of images)"
        )
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(
            f"config.data.path={path!r} {what}; point it at a folder of images "
            "(root/class/*.JPEG or flat)"
        )
    folder = FolderSource(path)
    if len(folder) == 0:
        raise FileNotFoundError(
            f"no images found under config.data.path={path!r} (looked recursively for files "
            f"ending in {', '.join(IMAGE_EXTENSIONS)}, any case); add images or fix the path"
        )
    return folder


def image_dataset(config: ml_collections.ConfigDict) -> grain.MapDataset:
    """The run's infinite stream of crops: element i is {"images": uint8 [S, S, 3], "bad_images"},
    a pure function of (config.seed, i). Epoch e is a fresh shuffle of the whole source."""
    source = _make_source(config)
    if len(source) < config.batch_size:
        if config.data.source == "builtin":
            where, fix = "config.data.builtin_size", "raise config.data.builtin_size"
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
