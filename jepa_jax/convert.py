"""The official PyTorch I-JEPA checkpoints (.pth.tar) <-> workdirs of this project.

  python -m jepa_jax.convert --checkpoint IN.pth.tar --out WORKDIR [--config=configs/default.py:P]
  python -m jepa_jax.convert --workdir WORKDIR --out OUT.pth.tar

The release saves one dict (encoder, predictor, target_encoder, opt, scaler, epoch, loss,
batch_size, world_size, lr) with DDP's `module.` before every parameter name; see
IJEPA_REFERENCE.md. The model is read off the shapes. A .pth.tar is a pickle: it is read only
with `torch.load(weights_only=True)`, which accepts tensors and plain containers and can run no
code from the file. torch is an optional extra, imported here and nowhere else.

A converted workdir is an ordinary one at step 0: the config's schedules (warmup, cosine, EMA)
run from their start, with the release's AdamW moments and their step count kept for Adam's bias
correction. It has no data position, so the data pipeline starts from its beginning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import flags
from ml_collections import config_flags

from jepa_jax import checkpoint, optim, sharding, trainer
from jepa_jax.configuration import validate
from jepa_jax.models.vit import SIZES, sincos_pos_embed

NETWORKS = ("encoder", "predictor", "target_encoder")
RELEASE_KEYS = (*NETWORKS, "opt", "scaler", "epoch", "loss", "batch_size", "world_size", "lr")
PREFIX = "module."  # DistributedDataParallel's, on every key the release saved
SIDECAR = "converted_from.json"  # the release's metadata, kept for the way back
INSTALL = 'pip install -e ".[torch]" (or pip install torch)'
# A fresh torch.cuda.amp.GradScaler's state: the release's loader restores one when bf16 is on.
DEFAULT_SCALER = {
    "scale": 65536.0,
    "growth_factor": 2.0,
    "backoff_factor": 0.5,
    "growth_interval": 2000,
    "_growth_tracker": 0,
}


class ConvertError(ValueError):
    """A checkpoint or workdir that cannot be converted; the message says why and what to do."""


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ConvertError(f"reading and writing .pth.tar files needs PyTorch: {INSTALL}") from e
    return torch


# --- the two layouts ---------------------------------------------------------------------------

# One transformer block: release name -> (our path under blocks.layers, kind), in the release's
# registration order (named_parameters() and state_dict() both follow it).
_BLOCK = (
    ("norm1.weight", ("norm1", "scale"), "vector"),
    ("norm1.bias", ("norm1", "bias"), "vector"),
    ("attn.qkv.weight", ("attn", "qkv", "kernel"), "linear"),
    ("attn.qkv.bias", ("attn", "qkv", "bias"), "vector"),
    ("attn.proj.weight", ("attn", "proj", "kernel"), "linear"),
    ("attn.proj.bias", ("attn", "proj", "bias"), "vector"),
    ("norm2.weight", ("norm2", "scale"), "vector"),
    ("norm2.bias", ("norm2", "bias"), "vector"),
    ("mlp.fc1.weight", ("fc1", "kernel"), "linear"),
    ("mlp.fc1.bias", ("fc1", "bias"), "vector"),
    ("mlp.fc2.weight", ("fc2", "kernel"), "linear"),
    ("mlp.fc2.bias", ("fc2", "bias"), "vector"),
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One release parameter and where it lives here."""

    name: str  # state-dict key without `module.`
    path: tuple[str, ...]  # our parameter path; () for the fixed positions (not a parameter here)
    layer: int | None  # index into the stacked blocks, or None
    kind: str  # linear: weight.T | patch: conv -> flat kernel | token: [1,1,D] | vector | pos


def entries(network: str, depth: int) -> list[Entry]:
    """The release's parameters of 'encoder' or 'predictor' in named_parameters() order, which
    also numbers them in the optimizer's state."""
    if network == "encoder":
        blocks = "blocks"
        head = [
            Entry("pos_embed", (), None, "pos"),
            Entry("patch_embed.proj.weight", ("patch_embed", "kernel"), None, "patch"),
            Entry("patch_embed.proj.bias", ("patch_embed", "bias"), None, "vector"),
        ]
        tail = [
            Entry("norm.weight", ("norm", "scale"), None, "vector"),
            Entry("norm.bias", ("norm", "bias"), None, "vector"),
        ]
    else:
        blocks = "predictor_blocks"
        head = [
            Entry("mask_token", ("mask_token",), None, "token"),
            Entry("predictor_pos_embed", (), None, "pos"),
            Entry("predictor_embed.weight", ("embed", "kernel"), None, "linear"),
            Entry("predictor_embed.bias", ("embed", "bias"), None, "vector"),
        ]
        tail = [
            Entry("predictor_norm.weight", ("norm", "scale"), None, "vector"),
            Entry("predictor_norm.bias", ("norm", "bias"), None, "vector"),
            Entry("predictor_proj.weight", ("proj", "kernel"), None, "linear"),
            Entry("predictor_proj.bias", ("proj", "bias"), None, "vector"),
        ]
    body = [
        Entry(f"{blocks}.{i}.{name}", ("blocks", "layers", *path), i, kind)
        for i in range(depth)
        for name, path, kind in _BLOCK
    ]
    return head + body + tail


def param_groups(encoder_depth: int, predictor_depth: int) -> list[list[tuple[str, Entry]]]:
    """The release's four AdamW groups (helper.init_opt): weights of the encoder, then of the
    predictor, then biases and 1-D parameters of each. Parameter ids count through them."""
    depths = {"encoder": encoder_depth, "predictor": predictor_depth}
    return [
        [(net, e) for e in entries(net, depths[net]) if (e.kind != "vector") == decayed]
        for decayed in (True, False)
        for net in ("encoder", "predictor")
    ]


def _to_ours(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "patch":  # [D, C, p, p] -> [p, p, C, D] -> [p*p*C, D]: patchify's (row, col, chan)
        return x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0])
    if kind == "token":
        return x.reshape(-1)
    return x


def _to_release(x: np.ndarray, kind: str, patch: int) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "patch":
        return x.reshape(patch, patch, 3, -1).transpose(3, 2, 0, 1)
    if kind == "token":
        return x.reshape(1, 1, -1)
    return x


def _release_shape(ours: tuple[int, ...], kind: str, patch: int) -> tuple[int, ...]:
    if kind == "linear":
        return ours[::-1]
    if kind == "patch":
        return (ours[1], 3, patch, patch)
    if kind == "token":
        return (1, 1, ours[0])
    return ours


def _at(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _positions(width: int, grid: int) -> np.ndarray:
    """The release's pos_embed buffer [1, N, width]: the same fixed table the model adds here."""
    return sincos_pos_embed(width, grid, grid)[None]


# --- reading a release checkpoint --------------------------------------------------------------


def load_release(path: str) -> dict:
    """The checkpoint dict, read without running code from the file; ConvertError otherwise."""
    torch = _torch()
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    is_zip = magic == b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
    if not is_zip and magic[:1] != b"\x80":  # the older format starts with a pickle
        raise ConvertError(
            f"{path} is not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)"
        )
    if is_zip and not zipfile.is_zipfile(path):
        raise ConvertError(
            f"{path} is cut short: it starts as a PyTorch checkpoint but its end is missing "
            "(an interrupted download or copy?); fetch it again"
        )
    try:
        # mmap: tensors are read from the file as they are converted (the pages can be dropped).
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        if "Weights only load failed" in lines[0]:
            what = next((x.strip() for x in lines if "Unsupported" in x), lines[-1].strip())
            raise ConvertError(
                f"{path} was refused: besides tensors and plain containers it holds Python "
                f"objects ({what[:200]}), and unpickling those could run code from the file. "
                "Only plain checkpoints (as the release saves them) are read"
            ) from e
        raise ConvertError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {lines[0][:200]}); fetch it again"
        ) from e


def _strip(state_dict, name: str, path: str) -> dict:
    """The state dict without DDP's prefix (keys saved without it are accepted as well)."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise ConvertError(f"{path}: '{name}' is not a state dict")
    bad = [k for k, v in state_dict.items() if not hasattr(v, "shape")]
    if bad:
        raise ConvertError(f"{path}: '{name}' holds non-tensors (first: {bad[0]!r})")
    return {k.removeprefix(PREFIX): v for k, v in state_dict.items()}


def _depth(state_dict: dict, blocks: str) -> int:
    pattern = re.compile(rf"{blocks}\.(\d+)\.norm1\.weight")
    return len({m[1] for k in state_dict if (m := pattern.fullmatch(k))})


def infer_model(encoder: dict, predictor: dict) -> dict:
    """config.model's shape fields (checkpoint.SHAPE_FIELDS) read off the release's shapes."""
    needed = [
        ("encoder", encoder, "patch_embed.proj.weight", 4),
        ("encoder", encoder, "pos_embed", 3),
        ("encoder", encoder, "blocks.0.mlp.fc1.weight", 2),
        ("predictor", predictor, "predictor_embed.weight", 2),
    ]
    for net, sd, key, ndim in needed:
        if key not in sd or len(sd[key].shape) != ndim:
            got = f"has shape {tuple(sd[key].shape)}" if key in sd else "is missing"
            raise ConvertError(
                f"the weights match no I-JEPA model: {net}.{key} {got} (the release's names and "
                "shapes are in IJEPA_REFERENCE.md)"
            )
    width, channels, p, p2 = encoder["patch_embed.proj.weight"].shape
    _, num_patches, pos_width = encoder["pos_embed"].shape
    hidden = encoder["blocks.0.mlp.fc1.weight"].shape[0]
    pred_dim = predictor["predictor_embed.weight"].shape[0]
    depth, pred_depth = _depth(encoder, "blocks"), _depth(predictor, "predictor_blocks")
    grid = math.isqrt(num_patches)
    found = f"width {width}, {depth} blocks, MLP {hidden}"
    size = next(
        (n for n, s in SIZES.items() if (s.width, s.depth, s.mlp_hidden) == (width, depth, hidden)),
        None,
    )
    known = "; ".join(f"{n} {s.width}/{s.depth}/{s.mlp_hidden}" for n, s in SIZES.items())
    if size is None:
        raise ConvertError(f"the encoder ({found}) matches no model size here ({known})")
    if channels != 3 or p != p2 or grid * grid != num_patches or pos_width != width:
        raise ConvertError(
            f"the encoder's patch embedding {tuple(encoder['patch_embed.proj.weight'].shape)} "
            f"and pos_embed {tuple(encoder['pos_embed'].shape)} describe no square RGB grid"
        )
    if pred_depth == 0 or pred_dim % SIZES[size].heads or pred_dim % 4:
        raise ConvertError(
            f"the predictor (width {pred_dim}, {pred_depth} blocks) matches no model: its width "
            f"must be a multiple of 4 and of the encoder's {SIZES[size].heads} heads"
        )
    return dict(
        variant=size, patch_size=p, image_size=grid * p, pred_depth=pred_depth, pred_dim=pred_dim
    )


def describe(model) -> str:
    size = SIZES[model["variant"]]
    grid = model["image_size"] // model["patch_size"]
    return (
        f"ViT-{model['variant']}/{model['patch_size']} encoder (width {size.width}, {size.depth} "
        f"blocks, {size.heads} heads) at {model['image_size']} px ({grid}x{grid} patches); "
        f"predictor of {model['pred_depth']} blocks, width {model['pred_dim']}"
    )


def _check_shapes(state_dicts: dict, params: dict, model) -> None:
    """Every release key present with the shape our abstract parameters imply, and no other."""
    patch, grid = model["patch_size"], model["image_size"] // model["patch_size"]
    problems = []
    for name, sd in state_dicts.items():
        net = "predictor" if name == "predictor" else "encoder"
        depth = model["pred_depth"] if net == "predictor" else SIZES[model["variant"]].depth
        expected = {}
        for e in entries(net, depth):
            if e.kind == "pos":
                width = model["pred_dim"] if net == "predictor" else SIZES[model["variant"]].width
                expected[e.name] = (1, grid * grid, width)
            else:
                shape = tuple(_at(params[net], e.path).shape)
                expected[e.name] = _release_shape(shape[e.layer is not None :], e.kind, patch)
        for key, shape in expected.items():
            if key not in sd:
                problems.append(f"{name}.{key} is missing")
            elif tuple(sd[key].shape) != shape:
                problems.append(f"{name}.{key} is {tuple(sd[key].shape)}, expected {shape}")
        problems += [f"{name}.{key} is unexpected" for key in sorted(set(sd) - set(expected))]
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise ConvertError(
            f"the weights match no model here ({describe(model)}): {'; '.join(problems[:4])}{more}"
        )


def _numpy(t) -> np.ndarray:
    return t.detach().float().numpy()  # a view of the (memory-mapped) file where float32


def _host() -> jax.Device:
    return jax.local_devices(backend="cpu")[0]


def _tree(net: str, like: dict, depth: int, value: Callable[[Entry], np.ndarray | None]) -> dict:
    """Our tree for `net` (shaped as `like`), each leaf assembled from `value(entry)` (a release
    array, or None for zeros) and moved into a jax array at once: one numpy leaf at a time."""
    by_path: dict[tuple[str, ...], list[Entry]] = {}
    for e in entries(net, depth):
        if e.kind != "pos":
            by_path.setdefault(e.path, []).append(e)
    out: dict = {}
    for path, group in by_path.items():
        leaf = np.zeros(_at(like, path).shape, np.float32)
        for e in group:
            x = value(e)
            if x is not None:
                leaf[e.layer if e.layer is not None else ...] = _to_ours(x, e.kind)
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.device_put(leaf, _host())
    return out


def _check_positions(state_dicts: dict) -> None:
    """The release's position buffers must be the fixed table: here they are not parameters."""
    for label, sd in state_dicts.items():
        key = "predictor_pos_embed" if label == "predictor" else "pos_embed"
        value = _numpy(sd.pop(key))
        want = _positions(value.shape[-1], math.isqrt(value.shape[1]))
        if not np.allclose(value, want, atol=1e-5):
            raise ConvertError(
                f"{label}.{key} is not the fixed 2-D sin-cos table (max difference "
                f"{np.abs(value - want).max():.3g}); positions are not parameters here, so this "
                "checkpoint cannot be converted exactly"
            )


def _adam_from_release(opt, like: dict, depths: dict, say) -> tuple[dict, dict, int] | None:
    """(mu, nu, step) from the release's AdamW state_dict, or None (with a line saying why)."""
    groups = param_groups(depths["encoder"], depths["predictor"])
    why = None
    if not isinstance(opt, dict) or not opt.get("state"):
        why = "the checkpoint holds no AdamW state"
    elif [len(g.get("params", ())) for g in opt.get("param_groups") or []] != [
        len(g) for g in groups
    ]:
        why = "its AdamW state does not have the release's four parameter groups"
    if why:
        say(f"{why}: AdamW starts fresh (zero moments)")
        return None
    by_name = {}  # (network, release name) -> that parameter's AdamW state
    for group, saved in zip(groups, opt["param_groups"], strict=True):
        for (net, e), pid in zip(group, saved["params"], strict=True):
            if opt["state"].get(pid):  # the fixed positions get no grad, hence no state
                by_name[net, e.name] = opt["state"][pid]
    steps = sorted({int(round(float(s["step"]))) for s in by_name.values()})
    if len(steps) > 1:
        say(f"AdamW step counts differ between parameters ({steps}); using {steps[-1]}")

    def moment(key):
        def value(net):
            return lambda e: _numpy(by_name[net, e.name][key]) if (net, e.name) in by_name else None

        return {n: _tree(n, like[n], depths[n], value(n)) for n in ("encoder", "predictor")}

    return moment("exp_avg"), moment("exp_avg_sq"), steps[-1]


# --- our side: configs, the training state --------------------------------------------------


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
        if all(config.model[f] == model[f] for f in checkpoint.SHAPE_FIELDS):
            return config, f"preset {name}"
        if close is None and config.model.variant == model["variant"]:
            close = name
    close = close or next(iter(default.PRESETS))
    config = default.get_config(close)
    config.model.update(model)
    return config, f"preset {close} with the checkpoint's model fields"


def check_config(config, model: dict) -> None:
    """ValueError naming every config.model field that disagrees with the checkpoint."""
    diffs = [
        f"config.model.{f}={config.model[f]!r} but the checkpoint has {model[f]!r}"
        for f in checkpoint.SHAPE_FIELDS
        if config.model[f] != model[f]
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
    config.model.attention = "reference"  # parameters never depend on it; cudnn may be absent
    config.mesh.data, config.mesh.fsdp = 1, 1
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    box = {}

    def make():
        _, state, box["tx"] = trainer.build(config, mesh)
        return state

    return jax.eval_shape(make), box["tx"]


def _is_adam(x) -> bool:
    return isinstance(x, optax.ScaleByAdamState)


def _opt_state(tx, params, abstract, mu, nu, count: int):
    """The optimizer state at step 0 with Adam's moments and count set (they are all it holds
    beyond the schedules' counters)."""
    scalars = jax.tree.map(lambda x: np.zeros((), x.dtype), params)
    small = jax.device_get(tx.init(scalars))  # counters and hyperparameters at step 0
    found = []

    def put(node):
        if not _is_adam(node):
            return node
        found.append(node)
        return optax.ScaleByAdamState(count=np.asarray(count, np.int32), mu=mu, nu=nu)

    state = jax.tree.map(put, small, is_leaf=_is_adam)
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
    nets = {name: _strip(ckpt[name], name, path) for name in NETWORKS}
    model = infer_model(nets["encoder"], nets["predictor"])
    if config is None:
        config, origin = config_for(model)
    else:
        check_config(config, model)
        origin = "--config"
    abstract, tx = abstract_state(config)
    like = abstract.params
    _check_shapes(nets, like, model)
    epoch = ckpt.get("epoch")
    say(f"Found: {describe(model)}; saved at epoch {epoch}")

    depths = {"encoder": SIZES[model["variant"]].depth, "predictor": model["pred_depth"]}
    _check_positions(nets)
    adam = _adam_from_release(ckpt.get("opt"), like, depths, say)

    def weights(net, tensors):  # release tensors, dropped as they are converted
        return _tree(net, like[net], depths[net], lambda e: _numpy(tensors.pop(e.name)))

    params = {net: weights(net, nets[net]) for net in ("encoder", "predictor")}
    target = weights("encoder", nets["target_encoder"])
    if adam is None:
        zeros = {n: _tree(n, like[n], depths[n], lambda e: None) for n in ("encoder", "predictor")}
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


# --- writing a release checkpoint --------------------------------------------------------------


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
    torch = _torch()
    width = _at(tree, ("norm", "scale")).shape[-1]
    depth = _at(tree, ("blocks", "layers", "norm1", "scale")).shape[0]
    grid = model["image_size"] // model["patch_size"]
    out = {}
    for e in entries(net, depth):
        if e.kind == "pos":
            value = _positions(width, grid)
        else:
            value = np.asarray(_at(tree, e.path))
            value = value if e.layer is None else value[e.layer]
            value = _to_release(value, e.kind, model["patch_size"])
        out[PREFIX + e.name] = torch.from_numpy(np.array(value, np.float32, order="C"))
    return out


def _release_opt(state, config, model: dict, meta: dict) -> dict:
    torch = _torch()
    depths = {"encoder": SIZES[model["variant"]].depth, "predictor": model["pred_depth"]}
    adam = [x for x in jax.tree.leaves(state.opt_state, is_leaf=_is_adam) if _is_adam(x)]
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
                    value = np.asarray(_at(tree[net], e.path))
                    value = value if e.layer is None else value[e.layer]
                    value = _to_release(value, e.kind, model["patch_size"])
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
    torch = _torch()
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out):
        raise ConvertError(f"{out} already exists; choose a new --out")
    config, state, step_dir = read_workdir(path)
    model = {f: config.model[f] for f in checkpoint.SHAPE_FIELDS}
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
    return out


# --- command line ------------------------------------------------------------------------------

USAGE = (
    "usage: python -m jepa_jax.convert --checkpoint IN.pth.tar --out WORKDIR "
    "[--config=configs/default.py:PRESET]\n"
    "       python -m jepa_jax.convert --workdir WORKDIR --out OUT.pth.tar"
)


def main(argv: list[str] | None = None) -> int:
    """The command; returns the exit status (errors are one line on stderr)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "A release .pth.tar to convert.", flag_values=fv)
    flags.DEFINE_string("workdir", None, "A workdir or step folder to export.", flag_values=fv)
    flags.DEFINE_string("out", None, "The new workdir, or the .pth.tar to write.", flag_values=fv)
    config_flags.DEFINE_config_file(
        "config", None, "With --checkpoint: configs/default.py:PRESET.", flag_values=fv
    )
    try:
        fv(list(sys.argv if argv is None else argv))
        if bool(fv.checkpoint) == bool(fv.workdir) or not fv.out:
            raise flags.Error("give --out and exactly one of --checkpoint and --workdir")
        if fv.workdir and fv.config is not None:
            raise flags.Error("--config goes with --checkpoint (a workdir holds its config)")
    except flags.Error as e:
        print(f"convert: {e}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        if fv.checkpoint:
            to_workdir(fv.checkpoint, fv.out, config=fv.config)
        else:
            to_release(fv.workdir, fv.out)
    except (ConvertError, OSError, ValueError, RuntimeError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
