"""Release -> workdir: the config for the inferred model, the training state at step 0 with the
release's weights and Adam moments, written as an ordinary checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from jepa_jax import checkpoint, sharding, trainer
from jepa_jax.configuration import validate
from jepa_jax.convert.layout import NETWORKS, RELEASE_KEYS, SIDECAR, ConvertError
from jepa_jax.convert.read_release import (
    adam_from_release,
    check_positions,
    check_shapes,
    describe,
    infer_model,
    load_release,
    our_tree,
    strip_prefix,
    to_numpy,
)
from jepa_jax.models.vit import encoder_size


def _presets():
    try:
        from configs import default
    except ImportError as e:
        raise ConvertError(
            "cannot import configs/default.py: run from the repository root or pass "
            "--config=PATH/TO/configs/default.py:PRESET"
        ) from e
    return default


def config_for(model: dict) -> tuple[ml_collections.ConfigDict, str]:
    """The preset whose model is exactly `model`, else the closest one with the model set."""
    default = _presets()
    close = None
    for name in default.PRESETS:
        config = default.get_config(name)
        if checkpoint.shape_fields(config.model) == model:
            return config, f"preset {name}"
        if close is None and config.model.variant == model["variant"]:
            close = name
    close = close or next(iter(default.PRESETS))
    config = default.get_config(close)
    config.model.update(model)
    return config, f"preset {close} with the checkpoint's model fields"


def check_config(config, model: dict) -> None:
    """ValueError naming every config.model field that disagrees with the checkpoint."""
    ours = checkpoint.shape_fields(config.model)
    diffs = [
        f"config.model.{f}={ours[f]!r} but the checkpoint has {model[f]!r}"
        for f in checkpoint.SHAPE_FIELDS
        if ours[f] != model[f]
    ]
    if diffs:
        raise ConvertError(
            f"--config does not fit the checkpoint: {'; '.join(diffs)}. Set those fields "
            "(--config.model.FIELD=VALUE) or leave --config out"
        )
    validate(config)


def abstract_state(config) -> tuple[trainer.TrainState, optax.GradientTransformation]:
    """The trainer's TrainState as abstract arrays (nothing allocated), and its optimizer."""
    config = ml_collections.ConfigDict(config.to_dict())
    # Parameters never depend on these; cuDNN and the kernels may not run here.
    config.model.attention, config.model.fused_qkv = "reference", "off"
    config.model.short_attention_backward, config.model.gelu_kernel = "off", "off"
    config.mesh.data, config.mesh.fsdp = 1, 1
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    box = {}

    def make():
        _, state, box["tx"] = trainer.build(config, mesh)
        return state

    return jax.eval_shape(make), box["tx"]


def is_adam(x) -> bool:
    return isinstance(x, optax.ScaleByAdamState)


def _opt_state(tx, params, abstract, mu, nu, count: int):
    """The optimizer state at step 0 with Adam's moments and count set (they are all it holds
    beyond the schedules' counters)."""
    scalars = jax.tree.map(lambda x: np.zeros((), x.dtype), params)
    small = jax.device_get(tx.init(scalars))  # counters and hyperparameters at step 0
    found = []

    def put(node):
        if not is_adam(node):
            return node
        found.append(node)
        return optax.ScaleByAdamState(count=np.asarray(count, np.int32), mu=mu, nu=nu)

    state = jax.tree.map(put, small, is_leaf=is_adam)
    if len(found) != 1:
        raise RuntimeError(f"expected one Adam state in the optimizer, found {len(found)}")
    _assert_like(state, abstract, "optimizer state")
    return state


def _assert_like(tree, abstract, what: str) -> None:
    if jax.tree.structure(tree) != jax.tree.structure(abstract):
        raise RuntimeError(f"converted {what} does not have the trainer's structure")
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(abstract), strict=True):
        if np.shape(a) != b.shape or a.dtype != b.dtype:
            raise RuntimeError(f"converted {what}: {np.shape(a)} {a.dtype} vs {b.shape} {b.dtype}")


def _plain(value):
    """JSON-able copy of the release's metadata (numbers, strings, containers, scalars)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if k != "params"}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "numel") and value.numel() == 1:
        return value.item()
    return value if isinstance(value, str | int | float | bool | type(None)) else None


def _fresh_out(out: str) -> str:
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConvertError(f"{out} already exists and is not an empty folder; choose a new --out")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    return out


def to_workdir(path: str, out: str, config=None, say=print) -> str:
    """Convert a release checkpoint into a workdir at `out`; returns the step folder.

    `config` (optional) must agree with the checkpoint's shapes. Nothing is left at `out`
    unless the conversion completed.
    """
    out = _fresh_out(out)
    ckpt = load_release(path)
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in NETWORKS):
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConvertError(
            f"{path} is not an I-JEPA training checkpoint: expected the keys {list(RELEASE_KEYS)}, "
            f"found {keys}"
        )
    nets = {name: strip_prefix(ckpt[name], name, path) for name in NETWORKS}
    model = infer_model(nets["encoder"], nets["predictor"])
    if config is None:
        config, origin = config_for(model)
    else:
        check_config(config, model)
        origin = "--config"
    abstract, tx = abstract_state(config)
    like = abstract.params
    check_shapes(nets, like, model)
    epoch = ckpt.get("epoch")
    say(f"Found: {describe(model)}; saved at epoch {epoch}")

    depths = {"encoder": encoder_size(model).depth, "predictor": model["pred_depth"]}
    check_positions(nets)
    adam = adam_from_release(ckpt.get("opt"), like, depths, say)

    def weights(net, tensors):  # release tensors, dropped as they are converted
        return our_tree(net, like[net], depths[net], lambda e: to_numpy(tensors.pop(e.name)))

    params = {net: weights(net, nets[net]) for net in ("encoder", "predictor")}
    target = weights("encoder", nets["target_encoder"])
    if adam is None:
        zeros = {
            n: our_tree(n, like[n], depths[n], lambda e: None) for n in ("encoder", "predictor")
        }
        mu, nu, count = zeros, jax.tree.map(jnp.copy, zeros), 0
    else:
        mu, nu, count = adam
        say(f"AdamW moments converted (the release's optimizer step {count})")
    state = trainer.TrainState(
        step=np.zeros((), np.int32),
        params=params,
        target=target,
        opt_state=_opt_state(tx, params, abstract.opt_state, mu, nu, count),
    )
    _assert_like(state, abstract, "training state")

    meta = {k: _plain(ckpt.get(k)) for k in ("epoch", "loss", "batch_size", "world_size", "lr")}
    meta["scaler"] = _plain(ckpt.get("scaler"))
    meta["opt_param_groups"] = _plain((ckpt.get("opt") or {}).get("param_groups"))
    meta["source"] = os.path.abspath(path)
    del ckpt, nets
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        _save_workdir(tmp, state, config)
        with open(os.path.join(tmp, SIDECAR), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above); rename needs it gone
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(
        f"Wrote {out} (step 0, config: {origin}). Features: jepa_jax.models.load_encoder({out!r}, "
        'which="target" or "context"); training: python train.py --config=... '
        f"--workdir={out}"
    )
    return os.path.join(out, checkpoint.CHECKPOINT_DIR, "0")


def _save_workdir(workdir: str, state, config) -> None:
    handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(
        os.path.join(workdir, checkpoint.CHECKPOINT_DIR), options=options, item_handlers=handlers
    )
    try:
        manager.save(
            0,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(json.loads(config.to_json())),
            ),
        )
        manager.wait_until_finished()
    finally:
        manager.close()
