"""I-JEPA multi-block masks with fixed shapes: numpy, host side, one batch per call.

Per batch one target block size and one context block size are drawn; each image gets its own
positions for its `num_targets` target blocks and its context block, and the context keeps only
tokens outside every target. Differences from the upstream MaskCollator, on purpose:
- block positions include the last row and column (upstream never covers them);
- every image keeps exactly `num_context` context tokens, a uniformly random subset of its
  context (upstream trims every image to the batch minimum, dropping bottom/right tokens, and
  so changes the shapes every batch);
- target blocks are padded to `max_target` tokens with their true lengths alongside.
Token index = row * W + col.

CLI: `python -m jepa_jax.masks --config=configs/default.py:vit_b16 --num_batches=200 [--png=P]
[--crops]` prints one JSON line of statistics (and draws a few masks with --png, with a legend,
over crops of the configured data with --crops).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import numpy as np

from jepa_jax.pictures import dense_masks, mask_picture

MAX_TRIES = 100  # redraws of one image's positions before the config is declared infeasible
_DERIVE_STRATA = 16  # 16 x 16 block-size cells for that mean (deterministic)
_DERIVE_IMAGES_PER_CELL = 128  # images per cell: 128 // trim_batch batches
_DERIVE_SEED = 20230613
_STREAM_TAG = 0x6D61736B  # "mask": keeps this stream apart from other users of the same seed


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Everything the sampler needs; fixes the output shapes for one config."""

    grid: tuple[int, int]  # patches (H, W) = image_size // patch_size each
    num_targets: int  # target blocks per image (M)
    target_scale: tuple[float, float]
    target_aspect: tuple[float, float]
    context_scale: tuple[float, float]
    min_keep: int
    num_context: int  # K_ctx: exact context tokens per image (fixed)
    max_target: int  # K_tgt: largest possible target block h*w (padding length)
    trim_batch: int = 128  # upstream's per-GPU batch: a derived num_context is its mean trim


# ---------------------------------------------------------------------------- block sizes


def _block_size(
    grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float], r
) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) for uniform draw(s) r, by upstream's rule; vectorised over r."""
    H, W = grid
    r = np.asarray(r, dtype=np.float64)
    # Upstream uses ONE uniform for both scale and aspect (so big blocks are also tall ones);
    # IJEPA_REFERENCE.md states the same. Kept, to reproduce the reference distribution.
    s = scale[0] + r * (scale[1] - scale[0])
    ar = aspect[0] + r * (aspect[1] - aspect[0])
    n = np.floor(H * W * s)
    # `>=` as upstream: a block never spans a full side. At least 1, which upstream lacks.
    h = np.clip(np.rint(np.sqrt(n * ar)), 1, H - 1).astype(np.int64)
    w = np.clip(np.rint(np.sqrt(n / ar)), 1, W - 1).astype(np.int64)
    return h, w


def _reachable_sizes(
    grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float]
) -> np.ndarray:
    """Every (h, w) the size rule can give for r in [0, 1], as rows of an [N, 2] array.

    h and w are piecewise constant in r; they change only where H*W*s crosses an integer or
    sqrt(n*ar), sqrt(n/ar) cross a half-integer. Evaluating the rule at those cut points and
    between them is exact, where a plain fine grid could miss a narrow interval.
    """
    H, W = grid
    cuts = [np.array([0.0, 1.0])]
    ds, da = scale[1] - scale[0], aspect[1] - aspect[0]
    ns = np.arange(math.floor(H * W * scale[0]), math.floor(H * W * scale[1]) + 1)
    if ds > 0:
        cuts.append((ns / (H * W) - scale[0]) / ds)
    if da > 0:
        half = np.arange(max(H, W) + 1) + 0.5
        n = np.maximum(ns[:, None], 1)
        cuts += [(half**2 / n - aspect[0]).ravel() / da, (n / half**2 - aspect[0]).ravel() / da]
    r = np.unique(np.clip(np.concatenate(cuts), 0.0, 1.0))
    r = np.concatenate([r, (r[1:] + r[:-1]) / 2])
    return np.unique(np.stack(_block_size(grid, scale, aspect, r), axis=1), axis=0)


def _draw_sizes(spec: MaskSpec, rng: np.random.Generator) -> tuple[tuple[int, int], ...]:
    """(target (h, w), context (h, w)) for one batch; targets first, as upstream."""
    tgt = _block_size(spec.grid, spec.target_scale, spec.target_aspect, rng.random())
    ctx = _block_size(spec.grid, spec.context_scale, (1.0, 1.0), rng.random())
    return (int(tgt[0]), int(tgt[1])), (int(ctx[0]), int(ctx[1]))


# ---------------------------------------------------------------------------- placement


def _rects(top: np.ndarray, left: np.ndarray, h: int, w: int, grid: tuple[int, int]):
    """Boolean [..., H*W] masks of h x w rectangles at (top, left)."""
    H, W = grid
    rows = (np.arange(H) >= top[..., None]) & (np.arange(H) < top[..., None] + h)
    cols = (np.arange(W) >= left[..., None]) & (np.arange(W) < left[..., None] + w)
    return (rows[..., :, None] & cols[..., None, :]).reshape(*top.shape, H * W)


def _draw_positions(
    n: int, spec: MaskSpec, tgt_hw, ctx_hw, rng: np.random.Generator, upstream: bool = False
):
    """Target (top, left) [n, M] each and the context mask [n, H*W] for n images."""
    H, W = spec.grid
    (th, tw), (ch, cw) = tgt_hw, ctx_hw
    # Inclusive upper bounds. Upstream draws from [0, H - h) and so never covers the last row
    # or column (facebookresearch/ijepa open PR #40); that bug is fixed here, and reproduced
    # (`upstream`) only to derive the context length upstream trains with.
    end = 0 if upstream else 1
    t_top = rng.integers(0, H - th + end, size=(n, spec.num_targets))
    t_left = rng.integers(0, W - tw + end, size=(n, spec.num_targets))
    c_top = rng.integers(0, H - ch + end, size=n)
    c_left = rng.integers(0, W - cw + end, size=n)
    targets = _rects(t_top, t_left, th, tw, spec.grid).any(axis=1)
    context = _rects(c_top, c_left, ch, cw, spec.grid) & ~targets
    return t_top, t_left, context


def _place(batch_size: int, spec: MaskSpec, tgt_hw, ctx_hw, need: int, rng, upstream=False):
    """Positions for a batch; images whose context has fewer than `need` tokens are redrawn."""
    t_top, t_left, context = _draw_positions(batch_size, spec, tgt_hw, ctx_hw, rng, upstream)
    bad = np.flatnonzero(context.sum(axis=1) < need)
    for _ in range(MAX_TRIES):
        if bad.size == 0:
            break
        redrawn = _draw_positions(bad.size, spec, tgt_hw, ctx_hw, rng, upstream)
        t_top[bad], t_left[bad], context[bad] = redrawn
        bad = bad[context[bad].sum(axis=1) < need]
    if bad.size:
        raise ValueError(
            f"masks: {bad.size} image(s) kept fewer than {need} context tokens after {MAX_TRIES} "
            f"position draws (grid {spec.grid}, {spec.num_targets} targets of {tgt_hw[0]}x"
            f"{tgt_hw[1]}, context block {ctx_hw[0]}x{ctx_hw[1]}); lower "
            "config.mask.num_context_tokens (-1 derives it) or config.mask.min_keep, or shrink "
            "config.mask.target_scale / config.mask.num_targets, or raise config.mask.context_scale"
        )
    return t_top, t_left, context


def sample_masks(
    spec: MaskSpec, batch_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One batch of masks: context_idx [B, K_ctx], target_idx [B, M, K_tgt], target_len [B, M]."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    H, W = spec.grid
    (th, tw), ctx_hw = _draw_sizes(spec, rng)  # once per batch
    if th * tw > spec.max_target:  # cannot happen for a spec from mask_spec()
        raise ValueError(f"target block {th}x{tw} exceeds max_target={spec.max_target}")
    need = max(spec.num_context, spec.min_keep)
    t_top, t_left, context = _place(batch_size, spec, (th, tw), ctx_hw, need, rng)

    # A uniformly random subset of exactly K_ctx context tokens: the K smallest random keys,
    # with every non-context token keyed above all context tokens.
    keys = rng.random(context.shape) + ~context
    k = spec.num_context
    context_idx = np.sort(np.argpartition(keys, k - 1, axis=1)[:, :k], axis=1)

    offsets = (np.arange(th)[:, None] * W + np.arange(tw)[None, :]).ravel()
    target_idx = np.zeros((batch_size, spec.num_targets, spec.max_target), np.int32)
    target_idx[..., : th * tw] = (t_top * W + t_left)[..., None] + offsets  # pad with 0: valid
    return {
        "context_idx": context_idx.astype(np.int32),
        "target_idx": target_idx,
        "target_len": np.full((batch_size, spec.num_targets), th * tw, np.int32),
    }


def mask_rng(seed: int, step: int, group: int = 0) -> np.random.Generator:
    """The mask generator of one (seed, step, group of trim_batch images): reproducible."""
    return np.random.default_rng(
        np.random.SeedSequence([seed, step, group], spawn_key=(_STREAM_TAG,))
    )


def step_masks(
    spec: MaskSpec, seed: int, step: int, global_batch: int, rows: slice
) -> dict[str, np.ndarray]:
    """Masks for `rows` of global batch `step`: a function of (seed, step) alone, whichever
    process asks. The batch is drawn in groups of `trim_batch` images, each with its own block
    sizes, as the release draws one size per per-GPU batch; only the groups that overlap
    `rows` are drawn."""
    start, stop, _ = rows.indices(global_batch)
    group = spec.trim_batch
    parts = []
    for g in range(start // group, (stop - 1) // group + 1):
        n = min(group, global_batch - g * group)
        parts.append(sample_masks(spec, n, mask_rng(seed, step, g)))
    first = (start // group) * group
    return {
        k: np.concatenate([p[k] for p in parts])[start - first : stop - first] for k in parts[0]
    }


# ---------------------------------------------------------------------------- config


@functools.lru_cache(maxsize=32)
def _derive_num_context(spec: MaskSpec) -> int:
    """The mean length upstream trains with: it trims every image's context to the minimum
    over its per-GPU batch (`trim_batch` images), with its own position bounds.

    Block sizes run over a stratified grid of the two uniform draws rather than random ones
    (the sizes move the minimum most), with as many images per cell whatever trim_batch is:
    the estimate then sits within about a token of the true mean, deterministically.
    """
    rng = np.random.default_rng(_DERIVE_SEED)
    strata = (np.arange(_DERIVE_STRATA) + 0.5) / _DERIVE_STRATA
    batches_per_cell = max(1, _DERIVE_IMAGES_PER_CELL // spec.trim_batch)
    minima = []
    for r_target in strata:
        tgt = _block_size(spec.grid, spec.target_scale, spec.target_aspect, r_target)
        for r_context in strata:
            ctx = _block_size(spec.grid, spec.context_scale, (1.0, 1.0), r_context)
            sizes = (int(tgt[0]), int(tgt[1])), (int(ctx[0]), int(ctx[1]))
            for _ in range(batches_per_cell):
                # need min_keep + 1: upstream redraws contexts of min_keep tokens or fewer
                _, _, context = _place(
                    spec.trim_batch, spec, *sizes, spec.min_keep + 1, rng, upstream=True
                )
                minima.append(context.sum(axis=1).min())
    return max(int(round(float(np.mean(minima)))), spec.min_keep)


def _check_range(name: str, value, upper: float | None) -> tuple[float, float]:
    """A (lo, hi) pair with 0 < lo <= hi (<= upper); ValueError naming the field otherwise."""
    allowed = f"a pair (lo, hi) with 0 < lo <= hi{f' <= {upper:g}' if upper else ''}"
    try:
        lo, hi = (float(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"config.mask.{name}={value!r}: not a pair of numbers; {allowed}"
        ) from None
    if not (0 < lo <= hi and (upper is None or hi <= upper)):
        raise ValueError(f"config.mask.{name}={value!r}: out of range; {allowed}")
    return lo, hi


def _check_int(name: str, value, lo: int, hi: int, note: str = "") -> int:
    """An integer in [lo, hi]; ValueError naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
        raise ValueError(f"config.mask.{name}={value!r}: must be an integer in [{lo}, {hi}]{note}")
    return int(value)


def mask_spec(config) -> MaskSpec:
    """The MaskSpec of a config (config.model's grid, config.mask.*), checking the mask fields:
    configuration.validate calls it once at startup, after the model fields."""
    grid = (config.model.image_size // config.model.patch_size,) * 2
    if min(grid) < 2:
        raise ValueError(
            f"config.model.image_size={config.model.image_size}: only {grid[0]} patch(es) per side "
            f"with patch size {config.model.patch_size}; masks need at least 2 per side"
        )
    m = config.mask
    num_targets = _check_int("num_targets", m.num_targets, 1, grid[0] * grid[1])
    target_scale = _check_range("target_scale", m.target_scale, 1.0)
    target_aspect = _check_range("target_aspect", m.target_aspect, None)
    context_scale = _check_range("context_scale", m.context_scale, 1.0)
    ctx_area = int(_reachable_sizes(grid, context_scale, (1.0, 1.0)).prod(axis=1).max())
    largest = " (the largest context block for this grid and config.mask.context_scale)"
    min_keep = _check_int("min_keep", m.min_keep, 1, ctx_area, largest)
    n_ctx = m.num_context_tokens
    trim_batch = _check_int("trim_batch", m.get("trim_batch", 128), 1, 1 << 20)
    if n_ctx != -1:
        _check_int("num_context_tokens", n_ctx, 1, ctx_area, largest + ", or -1 to derive it")
    spec = MaskSpec(
        grid=grid,
        num_targets=num_targets,
        target_scale=target_scale,
        target_aspect=target_aspect,
        context_scale=context_scale,
        min_keep=min_keep,
        num_context=int(n_ctx),
        max_target=int(_reachable_sizes(grid, target_scale, target_aspect).prod(axis=1).max()),
        trim_batch=trim_batch,
    )
    if n_ctx == -1:
        spec = dataclasses.replace(spec, num_context=_derive_num_context(spec))
    return spec


# ---------------------------------------------------------------------------- CLI


def first_crops(config, step: int, count: int) -> np.ndarray:
    """uint8 [count, S, S, 3]: the first `count` crops of global batch `step` (what the trainer
    feeds with that step's masks), read from the configured data."""
    from jepa_jax import data

    start = step * config.batch_size
    config = config.copy_and_resolve_references()
    config.batch_size = count  # the crop stream does not depend on it; only its size check does
    dataset = data.image_dataset(config)
    return np.stack([dataset[start + i]["images"] for i in range(count)])


def write_png(path: str, config, batch: dict[str, np.ndarray], crops: bool = False) -> None:
    """A picture of the batch's first masks with a title and legend, over real crops if asked."""
    from PIL import Image

    spec = mask_spec(config)
    n = min(4, len(batch["context_idx"]))
    images = first_crops(config, 0, n) if crops else None
    where = f" over crops of {config.data.source} data" if crops else ""
    title = f"I-JEPA masks ({config.get('preset', 'config')}, step 0){where}"
    picture = mask_picture(batch, spec.grid, crops=images, num_images=n, title=title)
    Image.fromarray(picture).save(path)


def run(
    config,
    num_batches: int,
    batch_size: int | None = None,
    png: str | None = None,
    crops: bool = False,
) -> dict:
    """Statistics of num_batches batches drawn as the trainer draws them (steps 0, 1, ...); with
    `png`, a picture of the first batch's masks (over the configured data's crops if `crops`)."""
    spec = mask_spec(config)
    H, W = spec.grid
    batch_size = batch_size or min(config.batch_size, spec.trim_batch)
    ctx_tokens = tgt_tokens = overlap = edge_hits = 0
    last_row_col = np.zeros((H, W), bool)
    last_row_col[-1], last_row_col[:, -1] = True, True
    for step in range(num_batches):
        batch = sample_masks(spec, batch_size, mask_rng(config.seed, step))
        context, targets = dense_masks(batch, H * W)
        union = targets.any(axis=1)
        ctx_tokens += context.sum()
        tgt_tokens += batch["target_len"].sum()
        overlap += (context & union).sum()
        edge_hits += (union & last_row_col.ravel()).any(axis=1).sum()
        if step == 0 and png:
            write_png(png, config, batch, crops)
    images = num_batches * batch_size
    return {
        "grid": list(spec.grid),
        "num_context": spec.num_context,
        "max_target": spec.max_target,
        "batch_size": batch_size,
        "num_batches": num_batches,
        "mean_context_tokens": float(ctx_tokens / images),
        "mean_target_tokens": float(tgt_tokens / (images * spec.num_targets)),
        "context_ratio": float(ctx_tokens / images / (H * W)),
        "context_target_overlap": int(overlap),
        # Fraction of images whose targets cover a token of the last row or last column.
        "last_row_col_coverage": float(edge_hits / images),
        "shapes": {k: list(v.shape) for k, v in batch.items()},
    }


def _main(argv) -> None:
    del argv
    f = _FLAGS
    print(json.dumps(run(f.config, f.num_batches, f.batch_size, f.png, f.crops)))


if __name__ == "__main__":
    # Flags only when run as a script: importing this module must not register global flags.
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/default.py:PRESET", lock_config=True)
    flags.DEFINE_integer("num_batches", 200, "batches to draw")
    flags.DEFINE_integer(
        "batch_size", None, "images per batch (default min(batch_size, mask.trim_batch))"
    )
    flags.DEFINE_string("png", None, "write a picture of the first batch's masks here")
    flags.DEFINE_bool("crops", False, "draw the --png masks over crops of the configured data")
    flags.mark_flag_as_required("config")
    _FLAGS = flags.FLAGS
    app.run(_main)
