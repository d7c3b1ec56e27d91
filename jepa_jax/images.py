"""Image files: list a folder, decode any file Pillow reads to RGB uint8, vet a folder.

Decoding is strict where silence would hurt (truncated files, decompression bombs) and lenient
where the pixels are fine (grayscale, CMYK, 16-bit, palette, alpha, EXIF orientation).
`python -m jepa_jax.data --check PATH` runs `check_folder` before a long run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import struct
import sys
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Transparent pixels are shown over white, as a browser would; their stored colour is arbitrary.
ALPHA_BACKGROUND = (255, 255, 255, 255)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# What Pillow raises on malformed input (its fuzz tests list these); anything else is a bug here.
_DECODE_ERRORS = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    EOFError,
    NotImplementedError,
    OverflowError,
    struct.error,
    Image.DecompressionBombError,
)


class BadImageError(ValueError):
    """A file that is not a decodable image; `reason` says what is wrong, in a few words."""

    def __init__(self, path: str, reason: str, fix: str = "remove or replace the file"):
        super().__init__(f"cannot decode image {path!r}: {reason}; {fix}")
        self.path, self.reason, self.fix = path, reason, fix

    def __reduce__(self):  # keeps the fields when grain sends it from a worker process
        return type(self), (self.path, self.reason, self.fix)


def list_images(root: str) -> list[str]:
    """Paths (relative to root) of files with an image extension, any case, in sorted order."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()  # os.walk order is filesystem order; sort for determinism
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.relpath(os.path.join(dirpath, name), root))
    return paths


def decode_image(path: str) -> np.ndarray:
    """The image at `path` as RGB uint8 [H, W, 3], EXIF orientation applied; BadImageError else."""
    try:
        with Image.open(path) as img:
            limit = Image.MAX_IMAGE_PIXELS
            # Pillow only warns between 1x and 2x the limit; a bomb is bad data either way.
            if limit and img.width * img.height > limit:
                raise Image.DecompressionBombError(
                    f"{img.width}x{img.height} pixels exceeds Image.MAX_IMAGE_PIXELS={limit}"
                )
            img.load()  # decode now: a truncated file raises here (LOAD_TRUNCATED_IMAGES is off)
            try:
                ImageOps.exif_transpose(img, in_place=True)
            except _DECODE_ERRORS:
                pass  # a malformed EXIF block: the pixels are fine, keep them unrotated
            return to_rgb(img)
    except _DECODE_ERRORS as e:
        reason = f"{type(e).__name__}: {e}"
        if isinstance(e, Image.UnidentifiedImageError):  # its message only repeats the path
            reason = "empty file" if _is_empty(path) else "not an image format Pillow can read"
        raise BadImageError(path, reason) from e


def _is_empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """uint8 [H, W] as RGB [H, W, 3]."""
    return np.repeat(grey[..., None], 3, axis=-1)


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode as RGB uint8: 16-bit scaled to 8, alpha composited over white."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit PNGs and TIFFs: Pillow's own conversion clips to 255 (white) instead of scaling.
        grey = (np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8)
        return grey_to_rgb(grey)
    if mode in _ALPHA_MODES or ("transparency" in img.info and mode in ("P", "L", "RGB")):
        background = Image.new("RGBA", img.size, ALPHA_BACKGROUND)
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return np.asarray(img.convert("RGB"))


@dataclasses.dataclass
class CheckReport:
    """What `check_folder` found: every image file, the undecodable ones, and the time taken."""

    root: str
    num_images: int
    bad: list[tuple[str, str]]  # (path, reason) in listing order
    seconds: float
    workers: int

    @property
    def images_per_s(self) -> float:
        return self.num_images / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (
            f"checked {self.num_images} images under {self.root} in {self.seconds:.1f} s "
            f"({self.images_per_s:.1f} images/s, {self.workers} threads): {len(self.bad)} bad"
        )


def _check_chunk(paths: Sequence[str]) -> list[tuple[str, str]]:
    bad = []
    for path in paths:
        try:
            decode_image(path)
        except BadImageError as e:
            bad.append((path, e.reason))
    return bad


def check_folder(
    root: str, *, workers: int | None = None, out=None, progress_every_s: float = 30.0
) -> CheckReport:
    """Decode every image under root as training would, in a thread pool (Pillow releases the
    GIL while decoding); print one line per bad file to `out` as found, in listing order."""
    workers = workers or os.cpu_count() or 1
    start = time.perf_counter()
    paths = [os.path.join(root, p) for p in list_images(root)]
    chunk = 32  # a future per chunk, not per file: ImageNet has 1.28M files
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    bad: list[tuple[str, str]] = []
    last = start
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for done, found in enumerate(pool.map(_check_chunk, chunks), 1):
            for path, reason in found:
                print(f"BAD {path}: {reason}", file=out, flush=True)
            bad += found
            now = time.perf_counter()
            if now - last > progress_every_s:
                checked = min(done * chunk, len(paths))
                rate = checked / (now - start)
                print(
                    f"... {checked}/{len(paths)} checked ({rate:.0f} images/s), {len(bad)} bad",
                    file=sys.stderr,
                    flush=True,
                )
                last = now
    return CheckReport(root, len(paths), bad, time.perf_counter() - start, workers)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jepa_jax.data --check PATH`: 0 if every image decodes, 1 if any is bad."""
    parser = argparse.ArgumentParser(
        prog="python -m jepa_jax.data",
        description="Vet an image folder before training: list files that cannot be decoded.",
    )
    parser.add_argument("--check", metavar="PATH", required=True, help="image folder to scan")
    parser.add_argument("--workers", type=int, default=None, help="threads (default: all cores)")
    args = parser.parse_args(argv)
    root = os.path.expanduser(args.check)
    if not os.path.isdir(root):
        print(f"--check {root!r}: not a directory", file=sys.stderr)
        return 2
    report = check_folder(root, workers=args.workers)
    print(report.summary(), flush=True)
    if report.num_images == 0:
        print(f"no files ending in {', '.join(IMAGE_EXTENSIONS)} (any case)", file=sys.stderr)
        return 2
    return 1 if report.bad else 0
