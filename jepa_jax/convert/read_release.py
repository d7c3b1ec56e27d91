"""Reading a release checkpoint: load it safely, infer the model from its shapes, check every
tensor, and take its AdamW moments."""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Callable

import jax
import numpy as np

from jepa_jax.convert.layout import (
    PREFIX,
    ConvertError,
    Entry,
    as_ours,
    at_path,
    entries,
    import_torch,
    param_groups,
    positions,
    release_shape,
)
from jepa_jax.models.vit import SIZES, encoder_size


def load_release(path: str) -> dict:
    """The checkpoint dict, read without running code from the file; ConvertError otherwise."""
    torch = import_torch()
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


def strip_prefix(state_dict, name: str, path: str) -> dict:
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
    found = f"width {width}, MLP {hidden}, {depth} blocks"
    # A size is its width and MLP; any depth is config.model.depth (-1: the size's own).
    size = next((n for n, s in SIZES.items() if (s.width, s.mlp_hidden) == (width, hidden)), None)
    known = "; ".join(f"{n} {s.width}/{s.mlp_hidden}" for n, s in SIZES.items())
    if size is None or depth == 0:
        raise ConvertError(f"the encoder ({found}) matches no model size here (width/MLP: {known})")
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
        variant=size,
        depth=-1 if depth == SIZES[size].depth else depth,
        patch_size=p,
        image_size=grid * p,
        pred_depth=pred_depth,
        pred_dim=pred_dim,
    )


def describe(model) -> str:
    size = encoder_size(model)
    grid = model["image_size"] // model["patch_size"]
    return (
        f"ViT-{model['variant']}/{model['patch_size']} encoder (width {size.width}, {size.depth} "
        f"blocks, {size.heads} heads) at {model['image_size']} px ({grid}x{grid} patches); "
        f"predictor of {model['pred_depth']} blocks, width {model['pred_dim']}"
    )


def check_shapes(state_dicts: dict, params: dict, model) -> None:
    """Every release key present with the shape our abstract parameters imply, and no other."""
    patch, grid = model["patch_size"], model["image_size"] // model["patch_size"]
    problems = []
    for name, sd in state_dicts.items():
        net = "predictor" if name == "predictor" else "encoder"
        depth = model["pred_depth"] if net == "predictor" else encoder_size(model).depth
        expected = {}
        for e in entries(net, depth):
            if e.kind == "pos":
                width = model["pred_dim"] if net == "predictor" else encoder_size(model).width
                expected[e.name] = (1, grid * grid, width)
            else:
                shape = tuple(at_path(params[net], e.path).shape)
                expected[e.name] = release_shape(shape[e.layer is not None :], e.kind, patch)
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


def to_numpy(t) -> np.ndarray:
    return t.detach().float().numpy()  # a view of the (memory-mapped) file where float32


def _host() -> jax.Device:
    return jax.local_devices(backend="cpu")[0]


def our_tree(net: str, like: dict, depth: int, value: Callable[[Entry], np.ndarray | None]) -> dict:
    """Our tree for `net` (shaped as `like`), each leaf assembled from `value(entry)` (a release
    array, or None for zeros) and moved into a jax array at once: one numpy leaf at a time."""
    by_path: dict[tuple[str, ...], list[Entry]] = {}
    for e in entries(net, depth):
        if e.kind != "pos":
            by_path.setdefault(e.path, []).append(e)
    out: dict = {}
    for path, group in by_path.items():
        leaf = np.zeros(at_path(like, path).shape, np.float32)
        for e in group:
            x = value(e)
            if x is not None:
                leaf[e.layer if e.layer is not None else ...] = as_ours(x, e.kind)
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.device_put(leaf, _host())
    return out


def check_positions(state_dicts: dict) -> None:
    """The release's position buffers must be the fixed table: here they are not parameters."""
    for label, sd in state_dicts.items():
        key = "predictor_pos_embed" if label == "predictor" else "pos_embed"
        value = to_numpy(sd.pop(key))
        want = positions(value.shape[-1], math.isqrt(value.shape[1]))
        if not np.allclose(value, want, atol=1e-5):
            raise ConvertError(
                f"{label}.{key} is not the fixed 2-D sin-cos table (max difference "
                f"{np.abs(value - want).max():.3g}); positions are not parameters here, so this "
                "checkpoint cannot be converted exactly"
            )


def adam_from_release(opt, like: dict, depths: dict, say) -> tuple[dict, dict, int] | None:
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
            return lambda e: (
                to_numpy(by_name[net, e.name][key]) if (net, e.name) in by_name else None
            )

        return {n: our_tree(n, like[n], depths[n], value(n)) for n in ("encoder", "predictor")}

    return moment("exp_avg"), moment("exp_avg_sq"), steps[-1]
