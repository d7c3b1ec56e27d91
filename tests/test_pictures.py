"""Pictures that explain themselves: the masks PNG (legend, title, over crops) and bench --plot;
and the encoder's one clear message for images of the wrong size."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs.default import get_config
from jepa_jax import bench, masks, models, pictures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_batch(config, n=4):
    spec = masks.mask_spec(config)
    return spec, masks.step_masks(spec, config.seed, 0, config.batch_size, slice(0, n))


def colour_count(picture, colour) -> int:
    return int((picture.reshape(-1, 3) == colour).all(axis=1).sum())


def test_mask_picture_has_every_part_and_a_legend():
    spec, batch = first_batch(get_config("tiny"))
    plain = pictures.mask_picture(batch, spec.grid, title="masks")
    assert plain.dtype == np.uint8 and plain.shape[2] == 3
    # Context, ignored and target 1 cells are drawn in their exact colours (targets may mix).
    for colour in (pictures.CONTEXT, pictures.IGNORED, pictures.TARGETS[0]):
        assert colour_count(plain, colour) > 100, colour
    # The legend: one swatch per target block below the panels, and the title's dark text.
    bottom = plain[-40:]
    for colour in pictures.TARGETS[: spec.num_targets]:
        assert colour_count(bottom, colour) >= 100, colour
    assert (plain[:30] < 60).all(axis=2).sum() > 50


def test_mask_picture_over_crops_shows_the_crops():
    config = get_config("tiny")
    spec, batch = first_batch(config)
    crops = masks.first_crops(config, 0, 4)
    assert crops.shape == (4, 96, 96, 3)
    over = pictures.mask_picture(batch, spec.grid, crops=crops)
    plain = pictures.mask_picture(batch, spec.grid)
    assert over.shape == plain.shape
    assert np.abs(over.astype(int) - plain).mean() > 5  # the images show through


def test_masks_cli_png_over_crops(tmp_path):
    png = tmp_path / "m.png"
    cmd = [sys.executable, "-m", "jepa_jax.masks", "--config=configs/default.py:tiny"]
    cmd += ["--num_batches=2", f"--png={png}", "--crops"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert len(out.strip().splitlines()) == 1 and json.loads(out)["grid"] == [6, 6]
    with Image.open(png) as image:
        assert image.size[0] > image.size[1] > 200


RESULTS = {
    "attention": {
        "rows": [
            {
                "impl": "reference",
                "shape": [2, 8, 2, 8],
                "fwd_ms": 1.0,
                "fwd_bwd_ms": 2.0,
                "fwd_bwd_temp_bytes": 2**20,
                "status": "ok",
            },
            {"impl": "cudnn", "shape": [2, 8, 2, 8], "status": "unavailable"},
        ],
    },
    "train": {
        "rows": [
            {
                "impl": "cudnn",
                "global_batch": 8,
                "img_per_s": 10.0,
                "peak_bytes": 2**30,
                "compile_s": 3.0,
                "status": "ok",
            },
            {"impl": "xla", "global_batch": 8, "status": "oom"},
        ],
    },
    "max-batch": {"rows": [{"impl": "xla", "max_per_device_batch": 64, "status": "ok"}]},
    "breakdown": {"rows": [{"impl": "xla", "part": "whole step", "ms": 5.0, "status": "ok"}]},
    "profile": {
        "rows": [],
        "summaries": [{"impl": "cudnn", "kernel_ms_by_kind": {"gemm": 3.0, "attention": 1.0}}],
    },
    "curves": {
        "rows": [
            {"impl": run, "window": w, "mean_loss": m, "over_first": r, "status": "ok"}
            for run, r in (("bf16", 1.0), ("fp8", 1.05))
            for w, m in (("1-250", 0.1), ("251-500", 0.03))
        ],
    },
}


@pytest.mark.parametrize("mode", sorted(RESULTS))
def test_bench_plot_draws_every_mode(tmp_path, mode):
    pytest.importorskip("matplotlib")
    result = {"mode": mode, "args": {"config": "tiny"}, "env": None, **RESULTS[mode]}
    bench.plot.plot(result, str(tmp_path / "p.png"))
    with Image.open(tmp_path / "p.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200


def test_bench_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png, out = tmp_path / "attention.png", tmp_path / "attention.json"
    argv = ["attention", "--impls", "reference,xla", "--shapes", "2x8x2x8", "--reps", "1"]
    bench.main(
        [*argv, "--warmup", "0", "--dtype", "float32", "--out", str(out), "--plot", str(png)]
    )
    assert png.exists() and json.loads(out.read_text())["mode"] == "attention"


def test_encoder_rejects_images_of_another_size():
    from flax import nnx

    # Abstract (no parameters initialised): the check runs on static shapes before any compute.
    encoder = nnx.eval_shape(lambda: models.create("vit_t16", image_size=32, pred_depth=1).encoder)
    encoder.check_images((1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"this encoder takes \[batch, 32, 32, 3\].*resize"):
        encoder(np.zeros((1, 48, 48, 3), np.float32))
    with pytest.raises(ValueError, match="images of shape"):
        encoder(np.zeros((32, 32, 3), np.float32))
