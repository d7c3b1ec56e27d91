"""What a run says at its start and at its end, in a few lines each: devices, batch, data,
parameters, attention and where things go; then steps, time, loss, the checkpoint and what to
run next. Also the picture of the first step's masks over its crops, for TensorBoard."""

from __future__ import annotations

import datetime
import os
import shlex
import sys

import jax
import numpy as np

from jepa_jax import attention, data, masks
from jepa_jax.models import fp8
from jepa_jax.pictures import mask_picture

PICTURE_IMAGES = 4  # images drawn in the start-of-run mask picture


def count_params(tree) -> int:
    """Number of parameters in a pytree of arrays (shapes only: nothing leaves the device)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def _dataset_size(dataset) -> int:
    """Images in the source under a grain MapDataset chain (its root, before repeat())."""
    while dataset.parents:
        dataset = dataset.parents[0]
    return len(dataset)


def first_batch_view(config, step: int) -> tuple[int, np.ndarray]:
    """(images in the configured data, a picture of step `step`'s first masks over its crops).

    Reads only those few crops, from the same stream the trainer reads (a pure function of the
    seed and the element index), so it shows exactly what that step trains on."""
    dataset = data.image_dataset(config)
    n = min(PICTURE_IMAGES, config.batch_size)
    start = step * config.batch_size
    crops = np.stack([dataset[start + i]["images"] for i in range(n)])
    spec = masks.mask_spec(config)
    batch = masks.step_masks(spec, config.seed, step, config.batch_size, slice(0, n))
    title = f"Masks of step {step} over its first {n} crops"
    return _dataset_size(dataset), mask_picture(batch, spec.grid, crops=crops, title=title)


def tensorboard_command(workdir: str) -> str:
    return f"tensorboard --logdir {shlex.quote(os.path.join(workdir, 'tensorboard'))}"


def startup_lines(config, workdir: str, mesh, net, state, num_images: int) -> list[str]:
    """The startup summary: devices and mesh, batch, data, parameters, attention, outputs."""
    procs = jax.process_count()
    mesh_shape = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
    per_device = config.batch_size // mesh.size
    d = config.data
    built_in = {"builtin": "built-in procedural images", "digits": "built-in MNIST digits (train)"}
    source = f"folder {d.path}" if d.source == "folder" else built_in[d.source]
    encoder = count_params(state.params["encoder"])
    predictor = count_params(state.params["predictor"])
    every = config.checkpoint_every
    saves = f"every {every} steps and at the end" if every else "at the end"
    ckpt_dir = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
    fp8_lines = []
    if fp8.setting(config.model) == "target":
        fp8_lines = [fp8.describe(attention.gpu_compute_capability())]
    return [
        f"Devices: {mesh.size} x {mesh.devices.flat[0].device_kind} ({procs} process"
        f"{'es' if procs > 1 else ''}), mesh {mesh_shape}; batch {config.batch_size} global, "
        f"{per_device} per device",
        f"Data: {source}, {num_images:,} images, {config.model.image_size} px crops",
        f"Parameters: encoder {_millions(encoder)} ({config.model.variant}, patch "
        f"{config.model.patch_size}), predictor {_millions(predictor)}, target encoder "
        f"{_millions(count_params(state.target))} (EMA copy of the encoder, not trained)",
        attention.startup_line(net.attention, net.layer_counts),
        net.fused_qkv.describe(),
        net.gelu_kernel.describe(),
        *fp8_lines,
        f"Checkpoints: {ckpt_dir} ({saves}, keeping {config.keep_checkpoints})",
        f"Logs: {os.path.join(workdir, 'metrics.jsonl')}; TensorBoard: "
        + tensorboard_command(workdir),
    ]


def rerun_command(config, workdir: str, drop: str | None = None) -> str:
    """The command that resumes this run (this one when run as train.py, else its equivalent),
    without the `drop` override (`--config.total_steps`: it is the one the user changes)."""
    if sys.argv and os.path.basename(sys.argv[0]) == "train.py":
        args = [a for a in sys.argv if not (drop and a.split("=")[0] == drop)]
        return "python " + shlex.join(args)
    preset = config.get("preset", "tiny")
    return f"python train.py --config=configs/default.py:{preset} --workdir={shlex.quote(workdir)}"


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def closing_lines(
    config,
    workdir: str,
    *,
    first: int,
    done: int,
    wall_s: float,
    first_step_s: float | None,
    step_s: float | None,
    last_loss: tuple[int, float] | None,
    checkpoint: str | None,
    stopped: str | None,
) -> list[str]:
    """The closing summary: what ran, how fast, the final loss, the checkpoint, what next."""
    command = rerun_command(config, workdir)
    if stopped:
        saved = f"saved {checkpoint}" if checkpoint else "nothing saved"
        lines = [
            f"Stopped by {stopped} after step {done}; {saved}. Rerun the same command to "
            f"resume: {command}"
        ]
    elif done == first and first >= config.total_steps:
        lines = [f"Nothing to do: the run already reached step {done} of {config.total_steps}"]
    else:
        timing = f"in {_duration(wall_s)}"
        if first_step_s is not None:
            timing += f" (first step with compilation {first_step_s:.1f} s"
            timing += f", then {step_s:.3g} s/step)" if step_s else ")"
        lines = [f"Done: {done - first} steps (step {first} -> {done}) {timing}"]
    if last_loss is not None:
        lines[-1] += f"; last loss {last_loss[1]:.4g} (step {last_loss[0]})"
    if checkpoint:
        lines.append(f"Checkpoint: {checkpoint}")
    if not stopped:
        longer = rerun_command(config, workdir, drop="--config.total_steps")
        lines.append(f"Train longer: {longer} --config.total_steps=N (N > {done})")
    if checkpoint:
        lines.append(
            f"Encoder: jepa_jax.models.load_encoder({workdir!r}) -> (encoder, config); "
            "README: Checkpoints"
        )
    lines.append(f"TensorBoard: {tensorboard_command(workdir)}")
    return lines
