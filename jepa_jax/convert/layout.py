"""The two layouts: the release's state-dict names and shapes against this project's parameter
trees, tensor by tensor, and what both formats share (names, the optional torch import)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jepa_jax.models.vit import sincos_pos_embed

NETWORKS = ("encoder", "predictor", "target_encoder")
RELEASE_KEYS = (*NETWORKS, "opt", "scaler", "epoch", "loss", "batch_size", "world_size", "lr")
PREFIX = "module."  # DistributedDataParallel's, on every key the release saved
SIDECAR = "converted_from.json"  # the release's metadata, kept for the way back
INSTALL = 'pip install -e ".[torch]" (or pip install torch)'


class ConvertError(ValueError):
    """A checkpoint or workdir that cannot be converted; the message says why and what to do."""


def import_torch():
    try:
        import torch
    except ImportError as e:
        raise ConvertError(f"reading and writing .pth.tar files needs PyTorch: {INSTALL}") from e
    return torch


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


def as_ours(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "patch":  # [D, C, p, p] -> [p, p, C, D] -> [p*p*C, D]: patchify's (row, col, chan)
        return x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0])
    if kind == "token":
        return x.reshape(-1)
    return x


def as_release(x: np.ndarray, kind: str, patch: int) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "patch":
        return x.reshape(patch, patch, 3, -1).transpose(3, 2, 0, 1)
    if kind == "token":
        return x.reshape(1, 1, -1)
    return x


def release_shape(ours: tuple[int, ...], kind: str, patch: int) -> tuple[int, ...]:
    if kind == "linear":
        return ours[::-1]
    if kind == "patch":
        return (ours[1], 3, patch, patch)
    if kind == "token":
        return (1, 1, ours[0])
    return ours


def at_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def positions(width: int, grid: int) -> np.ndarray:
    """The release's pos_embed buffer [1, N, width]: the same fixed table the model adds here."""
    return sincos_pos_embed(width, grid, grid)[None]
