"""Tests for the grain input pipeline: sources, crops, sharding, determinism, resume, errors."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs.default import get_config
from jepa_jax import data


def _config(**data_fields):
    c = get_config("tiny")
    c.seed = 0
    c.batch_size = 8
    c.model.image_size = 32
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
    batch = next(data.create_iterator(_config()))
    assert set(batch) == {"images"}
    images = batch["images"]
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
    # Every image has spatial structure, and images differ from each other.
    assert all(img.std() > 5 for img in images)
    assert len({img.tobytes() for img in images}) == 8


def test_builtin_source_is_a_pure_function_of_the_index():
    source = data.BuiltinSource(10)
    assert len(source) == 10
    first = source[3]
    assert first.shape == (256, 256, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, data.BuiltinSource(10)[3])
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

    source = data.FolderSource(str(tmp_path))
    assert len(source) == 12
    paths = [source.path(i) for i in range(len(source))]
    assert paths == sorted(paths)  # sorted walk: a deterministic order
    assert source[0].ndim == 3 and source[0].shape[2] == 3

    batch = next(data.create_iterator(_config(source="folder", path=str(tmp_path))))
    assert batch["images"].shape == (8, 32, 32, 3) and batch["images"].dtype == np.uint8


def test_folder_source_converts_to_rgb(tmp_path):
    Image.new("L", (10, 12), 200).save(tmp_path / "gray.png")
    Image.new("RGBA", (10, 12), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    source = data.FolderSource(str(tmp_path))
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


def test_iterator_state_resumes_exactly():
    config = _config(builtin_size=16)  # 2 batches per epoch: resume crosses epochs
    it = data.create_iterator(config)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = data.create_iterator(config)
    fresh.set_state(state)
    for x, y in zip(expected, _take(fresh, 3), strict=True):
        np.testing.assert_array_equal(x, y)


def test_worker_processes_match_in_process_and_resume():
    reference = _take(data.create_iterator(_config()), 4)
    it = data.create_iterator(_config(num_workers=2))
    try:
        got = _take(it, 2)
        state = it.get_state()
        got += _take(it, 2)
    finally:
        it.close()
    for x, y in zip(reference, got, strict=True):
        np.testing.assert_array_equal(x, y)
    resumed = data.create_iterator(_config(num_workers=2))
    try:
        resumed.set_state(state)
        for x, y in zip(reference[2:], _take(resumed, 2), strict=True):
            np.testing.assert_array_equal(x, y)
    finally:
        resumed.close()


# --- errors a user can cause ------------------------------------------------------------------


def test_unknown_source_names_allowed_values():
    with pytest.raises(ValueError, match=r"config\.data\.source='imagenet'.*builtin, folder"):
        data.create_dataset(_config(source="imagenet"))


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
    with pytest.raises(ValueError, match=r"fewer than its batch of 8.*lower config\.batch_size"):
        data.create_dataset(_config(source="folder", path=str(tmp_path)))
    with pytest.raises(ValueError, match=r"gets 2 of 4 images.*builtin_size"):
        data.create_dataset(_config(builtin_size=4), process_index=1, process_count=2)


def test_batch_size_not_divisible_by_processes():
    with pytest.raises(ValueError, match=r"config\.batch_size=8 .*multiple of 3"):
        data.create_dataset(_config(), process_count=3)


def test_corrupt_image_names_the_file_and_the_fix(tmp_path):
    _write_coloured_pngs(tmp_path, 7)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg" * 10)
    it = data.create_iterator(_config(source="folder", path=str(tmp_path)))
    with pytest.raises(ValueError, match="remove or replace") as err:
        next(it)
    assert str(bad) in str(err.value)


# --- normalisation ----------------------------------------------------------------------------


def test_normalize_matches_numpy():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    got = data.normalize(jnp.asarray(images))
    assert got.dtype == jnp.float32 and got.shape == images.shape
    expected = (images / 255.0 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
