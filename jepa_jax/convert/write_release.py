"""Workdir -> release: a training state written back as the release's .pth.tar, with the
metadata the conversion kept."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jepa_jax import checkpoint, optim, trainer
from jepa_jax.convert.layout import (
    PREFIX,
    SIDECAR,
    ConvertError,
    as_release,
    at_path,
    entries,
    import_torch,
    param_groups,
    positions,
)
from jepa_jax.convert.read_release import describe
from jepa_jax.convert.write_workdir import abstract_state, is_adam
from jepa_jax.models.activations import gelu_formula
from jepa_jax.models.vit import encoder_size

# A fresh torch.cuda.amp.GradScaler's state: the release's loader restores one when bf16 is on.
DEFAULT_SCALER = {
    "scale": 65536.0,
    "growth_factor": 2.0,
    "backoff_factor": 0.5,
    "growth_interval": 2000,
    "_growth_tracker": 0,
}


def read_workdir(path: str) -> tuple[ml_collections.ConfigDict, trainer.TrainState, str]:
    """(config, state as host arrays, step folder) of a workdir's latest or a given step."""
    step_dir = checkpoint._find_step_dir(path)
    config_dir = os.path.join(step_dir, "config")
    saved = checkpoint._reading(
        step_dir, lambda: ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(config_dir)
    )
    config = ml_collections.ConfigDict(saved)
    abstract, _ = abstract_state(config)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract
    )
    state_dir = os.path.join(step_dir, "state")
    state = checkpoint._reading(
        step_dir, lambda: ocp.StandardCheckpointer().restore(state_dir, target)
    )
    return config, state, step_dir


def _release_state_dict(tree: dict, net: str, model: dict) -> dict:
    torch = import_torch()
    width = at_path(tree, ("norm", "scale")).shape[-1]
    depth = at_path(tree, ("blocks", "layers", "norm1", "scale")).shape[0]
    grid = model["image_size"] // model["patch_size"]
    out = {}
    for e in entries(net, depth):
        if e.kind == "pos":
            value = positions(width, grid)
        else:
            value = np.asarray(at_path(tree, e.path))
            value = value if e.layer is None else value[e.layer]
            value = as_release(value, e.kind, model["patch_size"])
        out[PREFIX + e.name] = torch.from_numpy(np.array(value, np.float32, order="C"))
    return out


def _release_opt(state, config, model: dict, meta: dict) -> dict:
    torch = import_torch()
    depths = {"encoder": encoder_size(model).depth, "predictor": model["pred_depth"]}
    adam = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(x)]
    if len(adam) != 1:
        raise RuntimeError(f"expected one Adam state in the optimizer, found {len(adam)}")
    adam = adam[0]
    count = int(np.asarray(adam.count))
    schedules = optim.schedules(config)
    step = int(np.asarray(state.step))
    hyper = {
        "lr": float(schedules.lr(step)),
        "betas": (float(config.optim.b1), float(config.optim.b2)),
        "eps": float(config.optim.eps),
        "weight_decay": float(schedules.wd(step)),
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
    }
    kept = meta.get("opt_param_groups")
    groups, states, pid = [], {}, 0
    for g, members in enumerate(param_groups(depths["encoder"], depths["predictor"])):
        if isinstance(kept, list) and len(kept) == 4:
            group = dict(kept[g])
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        else:
            group = dict(hyper) if g < 2 else {**hyper, "WD_exclude": True, "weight_decay": 0}
        ids = []
        for net, e in members:
            ids.append(pid)
            if count > 0 and e.kind != "pos":  # no grad, no state: as torch leaves them
                moments = []
                for tree in (adam.mu, adam.nu):
                    value = np.asarray(at_path(tree[net], e.path))
                    value = value if e.layer is None else value[e.layer]
                    value = as_release(value, e.kind, model["patch_size"])
                    moments.append(torch.from_numpy(np.array(value, np.float32, order="C")))
                states[pid] = {
                    "step": torch.tensor(float(count)),
                    "exp_avg": moments[0],
                    "exp_avg_sq": moments[1],
                }
            pid += 1
        groups.append({**group, "params": ids})
    return {"state": states, "param_groups": groups}


def to_release(path: str, out: str, say=print) -> str:
    """Write the workdir (or step folder) `path` as a release checkpoint at `out`."""
    torch = import_torch()
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out):
        raise ConvertError(f"{out} already exists; choose a new --out")
    config, state, step_dir = read_workdir(path)
    model = checkpoint.shape_fields(config.model)
    root = os.path.dirname(os.path.dirname(step_dir))
    meta = {}
    if os.path.exists(os.path.join(root, SIDECAR)):
        with open(os.path.join(root, SIDECAR)) as f:
            meta = json.load(f)
    step = int(np.asarray(state.step))
    release = {
        "encoder": _release_state_dict(state.params["encoder"], "encoder", model),
        "predictor": _release_state_dict(state.params["predictor"], "predictor", model),
        "target_encoder": _release_state_dict(state.target, "encoder", model),
        "opt": _release_opt(state, config, model, meta),
        "scaler": meta["scaler"] if "scaler" in meta else dict(DEFAULT_SCALER),
        "epoch": meta.get("epoch", 0),
        "loss": meta.get("loss", float("nan")),
        "batch_size": meta.get("batch_size", config.batch_size),
        "world_size": meta.get("world_size", 1),
        "lr": meta.get("lr", config.optim.lr),
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        torch.save(release, tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    say(f"Wrote {out}: {describe(model)}; from {step_dir} (step {step}), epoch {release['epoch']}")
    if gelu_formula(config.model) == "tanh":
        say(
            "Note: this run trained with config.model.gelu=tanh, and the release's model computes "
            "the exact GELU: with these weights its outputs differ slightly (each GELU by at most "
            "5e-4)."
        )
    return out
