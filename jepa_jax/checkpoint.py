"""Orbax checkpoints: save and exactly resume training (the I/O; models.load_encoder reads them
for users).

A checkpoint is one folder WORKDIR/checkpoints/<step> with three items:
  state/     the TrainState (encoder, predictor, EMA target, AdamW state, step), sharded arrays;
  config/    the run's config as JSON, for compatibility checks and `models.load_encoder`;
  counters/  the run's running totals (substituted images, skipped steps) as JSON.
Nothing else is needed for an exact resume: batch k (crops and masks) is a pure function of
(seed, k) and the schedules of the step, so there is no data position or RNG state to save, and
a run resumes on any number of processes or data workers. (Checkpoints written before this also
hold data/, the grain position, which is no longer read.)

Orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save never leaves a half checkpoint that a later run would pick up.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from jepa_jax import sharding

CHECKPOINT_DIR = "checkpoints"
# The model fields that decide parameter shapes. attention, dtype and remat never change the
# (float32) parameters, so a checkpoint resumes or loads under any of them.
SHAPE_FIELDS = ("variant", "depth", "patch_size", "image_size", "pred_depth", "pred_dim")
ENCODERS = {"target": ("target",), "context": ("params", "encoder")}
T = TypeVar("T")


def _handlers() -> dict:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "counters": ocp.JsonCheckpointHandler(),
        # Written by checkpoints from before batches became a function of the step; never read,
        # registered so that the manager still recognises those folders.
        "data": grain.checkpoint.CheckpointHandler(),
    }


def _reading(path: str, read: Callable[[], T]) -> T:
    """read(); any failure becomes one message naming the checkpoint `path` and what to do."""
    try:
        return read()
    except Exception as e:  # orbax and tensorstore raise many types, some a bare Exception
        while e.__cause__ is not None:  # the innermost error says what is wrong (orbax wraps it)
            e = e.__cause__
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        error = RuntimeError(
            f"cannot read the checkpoint at {path} ({type(e).__name__}: {detail}). It is corrupt "
            "or incomplete: delete that step folder to resume from the previous checkpoint, or "
            "use another --workdir. Nothing was deleted."
        )
    # orbax abandons the other reads of a failed restore as never-awaited coroutines; collect
    # them now, silently, or their tracebacks (whole tensorstore specs) bury this message.
    hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook
    raise error


def shape_fields(model) -> dict:
    """The SHAPE_FIELDS of `model` (config.model or a saved dict of it); configs saved before
    `depth` existed get its default, -1 (the variant's depth)."""
    return {f: model.get(f, -1) if f == "depth" else model[f] for f in SHAPE_FIELDS}


def check_compatible(saved: dict, config, path: str) -> None:
    """Raise ValueError naming every field that stops `config` from resuming the checkpoint."""
    theirs, ours = shape_fields(saved["model"]), shape_fields(config.model)
    diffs = [
        f"config.model.{f}={ours[f]!r} but the checkpoint has {theirs[f]!r}"
        for f in SHAPE_FIELDS
        if theirs[f] != ours[f]
    ]
    if diffs:
        raise ValueError(
            f"cannot resume from the checkpoint at {path}: {'; '.join(diffs)}. Set those fields "
            "to the checkpoint's values, or use another --workdir to start a new run."
        )


def restore_target(state, mesh: jax.sharding.Mesh):
    """Abstract arrays (shape, dtype, `mesh`'s sharding) of a state or of its eval_shape."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state,
        sharding.state_shardings(mesh, state),
    )


class Checkpointer:
    """A training run's checkpoints: async saves, keep-N, restore of the latest onto any mesh."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        """Open (or create) WORKDIR/checkpoints; raise if its latest checkpoint cannot resume."""
        self.config = config
        self.directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(config.keep_checkpoints),
            # Temporary folders are saves a crash interrupted; they can never be restored.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_handlers()
        )
        self._config_json = json.loads(config.to_json())
        self.last_saved = self.latest_step
        if self.latest_step is not None:
            try:  # fail before anything is built or compiled
                saved = self._read(self.latest_step, "config")
                check_compatible(saved, config, self.path())
            except Exception:
                self.manager.close()
                raise

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int | None = None) -> str:
        return os.path.join(self.directory, str(self.latest_step if step is None else step))

    def _read(self, step: int, item: str, args=None):
        """One item of one step; anything unreadable becomes the corrupt-checkpoint message."""
        args = ocp.args.Composite(**{item: args or ocp.args.JsonRestore()})
        return _reading(self.path(step), lambda: self.manager.restore(step, args=args)[item])

    def restore(self, target, counters: dict[str, int]) -> tuple:
        """(state, counters) of the latest checkpoint: the state laid out as `target` (abstract
        arrays), and the saved running totals over `counters`' keys (0 where not saved)."""
        step = self.latest_step
        state = self._read(step, "state", ocp.args.StandardRestore(target))
        if os.path.isdir(os.path.join(self.path(step), "counters")):
            saved = self._read(step, "counters")
            counters = {k: int(saved.get(k, 0)) for k in counters}
        return state, counters

    def due(self, step: int) -> bool:
        """Whether the schedule saves after `step` (every checkpoint_every, and at the end)."""
        every = self.config.checkpoint_every
        return step == self.config.total_steps or (every > 0 and step % every == 0)

    def save(self, step: int, state, counters: dict[str, int]) -> None:
        """Start an async save of `state` after `step` (arrays are copied before it returns)."""
        if step == self.last_saved:
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(self._config_json),
            counters=ocp.args.JsonSave(counters),
        )
        # force: we decide when to save (due / preemption), not the manager's policy. The save
        # waits for the previous one, so a failed write of that one surfaces here too.
        self._writing(step, lambda: self.manager.save(step, args=args, force=True))
        self.last_saved = step

    def _writing(self, step: int, write: Callable[[], object]) -> None:
        """write(); a failure (disk full, permissions) becomes one message saying what is kept."""
        try:
            write()
        except Exception as e:  # orbax and tensorstore raise many types
            while e.__cause__ is not None:
                e = e.__cause__
            detail = (str(e).strip().splitlines() or [""])[0][:300]
            # Orbax renames a save into place once complete: finished ones are the digit names.
            done = os.listdir(self.directory) if os.path.isdir(self.directory) else []
            done = [int(n) for n in done if n.isdigit() and int(n) != step]
            kept = f"the checkpoint of step {max(done)} ({self.path(max(done))})" if done else None
            kept = kept or "no earlier checkpoint exists; nothing"
            raise RuntimeError(
                f"cannot write the checkpoint of step {step} under {self.directory} "
                f"({type(e).__name__}: {detail}); {kept} is intact, and a rerun resumes from it. "
                "Free disk space or fix the folder's permissions, or use another --workdir"
            ) from None

    def reached_preemption(self, step: int) -> bool:
        """Multi-host preemption, agreed on by all hosts through JAX's preemption service."""
        return jax.process_count() > 1 and self.manager.reached_preemption(step)

    def close(self) -> None:
        """Wait for pending saves to be finalised, then release the manager."""
        try:
            self._writing(self.last_saved, self.manager.wait_until_finished)
        finally:
            self.manager.close()


def _find_step_dir(path: str) -> str:
    """A step folder from a workdir, its checkpoints/ folder, or a step folder itself."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"no checkpoint at {path}: it does not exist or is not a folder; pass a training "
            "workdir or one of its step folders (WORKDIR/checkpoints/<step>)"
        )
    if os.path.isdir(os.path.join(path, "state")):
        return path
    directory = os.path.join(path, CHECKPOINT_DIR)
    directory = directory if os.path.isdir(directory) else path
    # Orbax names a save in progress "<step>.orbax-checkpoint-tmp-*": only finished ones are digits.
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
    if not steps:
        raise FileNotFoundError(
            f"no finished checkpoint under {directory}; pass a training workdir or one of its "
            "step folders (WORKDIR/checkpoints/<step>)"
        )
    return os.path.join(directory, str(max(steps)))


def read_config(path: str) -> tuple[str, ml_collections.ConfigDict]:
    """(step folder, the run's config) from a workdir, its checkpoints/ folder or a step folder."""
    step_dir = _find_step_dir(path)
    config_dir = os.path.join(step_dir, "config")
    saved = _reading(
        step_dir, lambda: ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(config_dir)
    )
    return step_dir, ml_collections.ConfigDict(saved)


def read_encoder_params(step_dir: str, which: str, abstract: dict) -> dict:
    """One encoder's parameters ("target" or "context"), laid out as `abstract` (arrays with
    shardings); the other encoder, the predictor and the AdamW moments stay on disk."""
    if which not in ENCODERS:
        raise ValueError(f"which={which!r}: choose one of {list(ENCODERS)}")
    keys = ENCODERS[which]
    item = abstract
    for key in reversed(keys):
        item = {key: item}
    args = ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    )
    state_dir = os.path.join(step_dir, "state")
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    restored = _reading(step_dir, lambda: checkpointer.restore(state_dir, args=args))
    for key in keys:
        restored = restored[key]
    return restored
