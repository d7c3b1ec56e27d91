"""Pictures of I-JEPA masks that explain themselves: a title, a legend, and optionally the
real input crops underneath (the masks CLI's --png and the TensorBoard image at a run's start).

Each panel is one image's patch grid: its context tokens (what the encoder sees) in blue, each
of its target blocks (what the predictor must predict) in its own colour, and every other token,
which neither sees nor predicts, grey. Over crops the colours are tints, so the picture shows
what each part of the image plays.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CONTEXT = (38, 139, 210)
IGNORED = (175, 175, 175)
TARGETS = ((220, 50, 47), (133, 153, 0), (211, 130, 0), (108, 113, 196), (42, 161, 152))
_MIN_PANEL = 192  # pixels: small grids and crops are scaled up to at least this


def dense_masks(batch: dict[str, np.ndarray], num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean context [B, T] and per-target [B, M, T] masks from a batch's index arrays."""
    B, M, K = batch["target_idx"].shape
    context = np.zeros((B, num_tokens), bool)
    np.put_along_axis(context, batch["context_idx"].astype(np.int64), True, axis=1)
    targets = np.zeros((B, M, num_tokens), bool)
    valid = np.arange(K) < batch["target_len"][..., None]
    b, mi, k = np.nonzero(valid)
    targets[b, mi, batch["target_idx"][b, mi, k]] = True
    return context, targets


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _token_colours(context: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[T, 3] float colours of one image's tokens and [T] tint strength (targets mixed)."""
    colours = np.array(TARGETS, float)[np.arange(targets.shape[0]) % len(TARGETS)]
    out = np.where(context[:, None], [CONTEXT], [IGNORED]).astype(float)
    alpha = np.where(context, 0.35, 0.8)  # over crops: context clear, the rest veiled
    hits = targets.T.astype(float)  # [T, M]
    covered = hits.sum(axis=1) > 0
    out[covered] = (hits @ colours)[covered] / hits.sum(axis=1)[covered, None]
    alpha[covered] = 0.55
    return out, alpha


def _panel(
    context: np.ndarray,
    targets: np.ndarray,
    grid: tuple[int, int],
    cell: int,
    crop: np.ndarray | None,
) -> Image.Image:
    """One image: tokens as cells of `cell` pixels, tinted over the crop when there is one."""
    H, W = grid
    colours, alpha = _token_colours(context, targets)
    fill = np.kron(colours.reshape(H, W, 3), np.ones((cell, cell, 1)))
    if crop is None:
        pixels = fill
    else:
        base = Image.fromarray(crop).resize((W * cell, H * cell), Image.Resampling.BILINEAR)
        a = np.kron(alpha.reshape(H, W, 1), np.ones((cell, cell, 1)))
        pixels = (1 - a) * np.asarray(base, float) + a * fill
    pixels[::cell], pixels[:, ::cell] = 255, 255  # token grid lines
    panel = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(panel)
    for m, block in enumerate(targets):  # outline each block: overlapping targets stay readable
        rows, cols = np.nonzero(block.reshape(H, W))
        if rows.size:
            box = (cols.min() * cell, rows.min() * cell, (cols.max() + 1) * cell - 1)
            box += ((rows.max() + 1) * cell - 1,)
            draw.rectangle(box, outline=TARGETS[m % len(TARGETS)], width=2)
    return panel


def mask_picture(
    batch: dict[str, np.ndarray],
    grid: tuple[int, int],
    *,
    crops: np.ndarray | None = None,
    num_images: int = 4,
    title: str | None = None,
) -> np.ndarray:
    """uint8 [H, W, 3]: the first `num_images` images' masks side by side, with a title and a
    legend; over `crops` (uint8 [B, S, S, 3], the images the masks belong to) when given."""
    H, W = grid
    context, targets = dense_masks(batch, H * W)
    n = min(num_images, len(context))
    side = crops.shape[1] if crops is not None else 12 * max(H, W)
    cell = max(1, -(-max(side, _MIN_PANEL) // max(H, W)))
    panels = [
        _panel(context[i], targets[i], grid, cell, None if crops is None else crops[i])
        for i in range(n)
    ]
    gap, pad = 8, 10
    width = max(n * W * cell + (n - 1) * gap + 2 * pad, 560)
    font, small = _font(15), _font(13)
    num_targets, k_ctx = targets.shape[1], int(batch["context_idx"].shape[1])
    target_len = int(batch["target_len"][0, 0])
    if title is None:
        title = f"I-JEPA masks: {n} images, {H}x{W} patch grid"
    subtitle = (
        f"encoder sees {k_ctx} context tokens; predictor predicts {num_targets} target blocks "
        f"of {target_len} tokens; grey: neither"
    )
    legend = [("context", CONTEXT)]
    legend += [(f"target {m + 1}", TARGETS[m % len(TARGETS)]) for m in range(num_targets)]
    legend += [("ignored", IGNORED), ("overlapping targets: mixed", (190, 120, 120))]
    top, row_h = pad + 44, 22
    # Legend entries wrap onto as many rows as the width needs.
    rows, x = [[]], pad
    for label, colour in legend:
        w = 18 + int(small.getlength(label)) + 16
        if x + w > width - pad and rows[-1]:
            rows.append([])
            x = pad
        rows[-1].append((x, label, colour))
        x += w
    height = top + H * cell + pad + len(rows) * row_h + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill="black", font=font)
    draw.text((pad, pad + 22), subtitle, fill=(80, 80, 80), font=small)
    for i, panel in enumerate(panels):
        canvas.paste(panel, (pad + i * (W * cell + gap), top))
    y = top + H * cell + pad
    for row in rows:
        for x, label, colour in row:
            draw.rectangle((x, y + 3, x + 12, y + 15), fill=colour, outline=(90, 90, 90))
            draw.text((x + 18, y + 1), label, fill="black", font=small)
        y += row_h
    return np.asarray(canvas)
