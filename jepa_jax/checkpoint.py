"""Orbax checkpoints: save and exactly resume training, and `load_encoder` for users.

A checkpoint is one folder WORKDIR/checkpoints/<step> with three items:
  state/   the TrainState (encoder, predictor, EMA target, AdamW state, step), sharded arrays;
  data/    the grain iterator position, one JSON file per process;
  config/  the run's config as JSON, for compatibility checks and `load_encoder`.
Nothing else is needed for an exact resume: crops are a pure function of (seed, image index),
masks of (seed, step, process), and the schedules of the step, so there is no RNG state to save.

Orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save never leaves a half checkpoint that a later run would pick up.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from jepa_jax import models, sharding

CHECKPOINT_DIR = "checkpoints"
# The model fields that decide parameter shapes. attention, dtype and remat never change the
# (float32) parameters, so a checkpoint resumes or loads under any of them. Resuming also needs
# the same config.data.num_workers: grain's saved position is per worker.
SHAPE_FIELDS = ("variant", "patch_size", "image_size", "pred_depth", "pred_dim")
ENCODERS = {"target": ("target",), "context": ("params", "encoder")}
T = TypeVar("T")


def _handlers() -> dict:
    # grain's handler writes process_<i>-of-<n>.json: every host keeps its own data position.
    return {
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
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


def check_compatible(saved: dict, config, path: str, data_position: bool = True) -> None:
    """Raise ValueError naming every field that stops `config` from resuming the checkpoint."""
    fields = [("model", f) for f in SHAPE_FIELDS]
    fields += [("data", "num_workers")] if data_position else []
    diffs = [
        f"config.{group}.{f}={config[group][f]!r} but the checkpoint has {saved[group].get(f)!r}"
        for group, f in fields
        if saved[group].get(f) != config[group][f]
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
                check_compatible(saved, config, self.path(), self.has_data_position())
            except Exception:
                self.manager.close()
                raise

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def path(self, step: int | None = None) -> str:
        return os.path.join(self.directory, str(self.latest_step if step is None else step))

    def has_data_position(self, step: int | None = None) -> bool:
        """False for a checkpoint converted from the PyTorch release (jepa_jax.convert): it
        holds no data position, so the data starts from the beginning, with any num_workers."""
        return os.path.isdir(os.path.join(self.path(step), "data"))

    def _read(self, step: int, item: str, args=None):
        """One item of one step; anything unreadable becomes the corrupt-checkpoint message."""
        args = ocp.args.Composite(**{item: args or ocp.args.JsonRestore()})
        return _reading(self.path(step), lambda: self.manager.restore(step, args=args)[item])

    def restore(self, target, iterator: grain.DatasetIterator | None = None):
        """The latest state laid out as `target` (abstract arrays); moves `iterator` to match."""
        step = self.latest_step
        state = self._read(step, "state", ocp.args.StandardRestore(target))
        if iterator is not None and self.has_data_position(step):
            index, count = jax.process_index(), jax.process_count()
            name = f"process_{index}-of-{count}.json"  # grain's file name for this process
            if not os.path.exists(os.path.join(self.path(step), "data", name)):
                raise ValueError(
                    f"the checkpoint at {self.path(step)} has no data position for process "
                    f"{index} of {count}: it was saved by a different number of processes; "
                    "resume with as many processes as the run that saved it"
                )
            self._read(step, "data", grain.checkpoint.CheckpointRestore(iterator))
        return state

    def due(self, step: int) -> bool:
        """Whether the schedule saves after `step` (every checkpoint_every, and at the end)."""
        every = self.config.checkpoint_every
        return step == self.config.total_steps or (every > 0 and step % every == 0)

    def save(self, step: int, state, iterator: grain.DatasetIterator) -> None:
        """Start an async save of `state` after `step` (arrays are copied before it returns)."""
        if step == self.last_saved:
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(iterator),
                config=ocp.args.JsonSave(self._config_json),
            ),
            force=True,  # we decide when to save (due / preemption), not the manager's policy
        )
        self.last_saved = step

    def reached_preemption(self, step: int) -> bool:
        """Multi-host preemption, agreed on by all hosts through JAX's preemption service."""
        return jax.process_count() > 1 and self.manager.reached_preemption(step)

    def close(self) -> None:
        """Wait for pending saves to be finalised, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


class StopSignals:
    """Turns SIGTERM/SIGINT into a flag checked after each step; a second SIGINT stops at once.

    Only installed in a single-process run on the main thread: with several processes, JAX's
    preemption service catches SIGTERM and `Checkpointer.reached_preemption` agrees on a step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


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


def load_encoder(
    path: str, which: str = "target", *, attention: str = "auto"
) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """(encoder, config) from a workdir or step folder: normalized [B,H,W,3] images -> [B,N,D].

    `which`: "target" (the EMA encoder, the one I-JEPA evaluates) or "context" (the online one).
    Only that encoder's parameters are read, onto the first local device.
    """
    if which not in ENCODERS:
        raise ValueError(f"which={which!r}: choose one of {list(ENCODERS)}")
    step_dir = _find_step_dir(path)
    config_dir = os.path.join(step_dir, "config")
    saved = _reading(
        step_dir, lambda: ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(config_dir)
    )
    config = ml_collections.ConfigDict(saved)
    m = ml_collections.ConfigDict(config.model.to_dict())
    m.residual_dtype = "float32"  # float32 features whatever the run trained with
    choice = models.resolve_attention(models.SIZES[m.variant], m.pred_dim, attention, m.dtype)
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: models.from_config(m, attention=choice).encoder)
    )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        nnx.to_pure_dict(abstract),
    )
    keys = ENCODERS[which]
    item = shapes
    for key in reversed(keys):
        item = {key: item}
    # Partial restore: the other encoder, the predictor and the AdamW moments stay on disk.
    args = ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    )
    state_dir = os.path.join(step_dir, "state")
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    restored = _reading(step_dir, lambda: checkpointer.restore(state_dir, args=args))
    for key in keys:
        restored = restored[key]
    name = "target (EMA)" if which == "target" else "context"
    print(
        f"Loaded the {name} encoder ({m.variant}, patch {m.patch_size}, {m.image_size}px, "
        f"attention {choice.name}) from {step_dir}",
        flush=True,
    )
    return nnx.merge(graphdef, restored), config
