"""Training end to end on the tiny preset: it learns, compiles once, and train.py works."""

import json
import os

import jax
import numpy as np
from PIL import Image

from configs.default import get_config
from jepa_jax import data, masks, sharding, trainer

STEPS = 12


def tiny_config():
    """The tiny preset for STEPS steps with 4 encoder blocks (it learns as well; its 12 only
    take longer). Both tests here use it: one compiled step serves both."""
    config = get_config("tiny")
    config.total_steps, config.model.depth = STEPS, 4
    return config


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loss_decreases_on_tiny(tmp_path):
    """It learns; and k-NN evaluation during training is logged with the metrics."""
    config = tiny_config()
    config.log_every = 1
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c, colour in enumerate(((220, 30, 30), (30, 30, 220))):
            os.makedirs(tmp_path / "labelled" / split / str(c))
            for i in range(n):
                noise = rng.integers(-30, 30, (32, 32, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "labelled" / split / str(c) / f"{i}.png")
    config.eval.every, config.eval.batch_size = STEPS // 2, 8
    config.eval.train_data = str(tmp_path / "labelled" / "train")
    config.eval.val_data = str(tmp_path / "labelled" / "val")
    state = trainer.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert int(state.step) == STEPS
    rows = read_metrics(tmp_path / "run")
    losses = [m["loss"] for m in rows]
    assert len(losses) == STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
    row = rows[-1]
    assert set(row) >= {"step", "loss", "lr", "wd", "momentum", "grad_norm", "img_per_s"}
    evaluated = [m["step"] for m in rows if "knn_top1" in m]
    assert evaluated == [STEPS // 2, STEPS] and 0 <= rows[-1]["knn_top1"] <= 100


def test_step_compiles_once_over_varying_masks(run_steps):
    config = tiny_config()
    spec = masks.mask_spec(config)
    draws = [masks.sample_masks(spec, 8, masks.mask_rng(config.seed, s)) for s in range(6)]
    sizes = {tuple(d["target_len"][0]) for d in draws}
    assert len(sizes) > 1, "masks should vary between steps"
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    state, step_fn, _ = run_steps(config, mesh, 6)
    assert step_fn._cache_size() == 1

    # A poisoned batch (no real target token: the loss is 0/0) changes nothing but the step.
    batch = next(data.create_iterator(config, first_step=6))
    batch["target_len"] = np.zeros_like(batch["target_len"])
    before = jax.device_get(state)
    after, metrics = step_fn(state, sharding.global_batch(mesh, batch))
    assert int(metrics["nonfinite"]) > 0 and int(after.step) == int(before.step) + 1
    for old, new in zip(
        jax.tree.leaves((before.params, before.target, before.opt_state)),
        jax.tree.leaves(jax.device_get((after.params, after.target, after.opt_state))),
        strict=True,
    ):
        np.testing.assert_array_equal(old, new)
    assert step_fn._cache_size() == 1
