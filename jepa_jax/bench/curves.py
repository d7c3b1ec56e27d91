"""`curves`: the loss curves of runs of the same command compared, from their metrics.jsonl.

Two runs differ by spread (GPU reductions are not bitwise reproducible, and thousands of steps
amplify that) as well as by what changed between them, so one logged step says little. The
comparison is by window: the mean logged loss over stretches of the run, each run against the
first, and after a burn-in how many logged steps a run sits above the first and how far it
strays. Only the steps every run logged count, so runs logged at other intervals or cut short
compare on what they share. An ASCII plot of the first two runs after the burn-in goes to
stdout (for BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
import os

# Window ends as fractions of the last common step: the first eighth (warmup), the rest of the
# first quarter, then quarters.
WINDOW_ENDS = (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)

CURVES_COLUMNS = (
    ("steps", lambda r: r["window"], ""),
    ("run", lambda r: r["impl"], ""),
    ("mean loss", lambda r: r["mean_loss"], ".5f"),
    ("minus first", lambda r: r["minus_first"], "+.5f"),
    ("over first", lambda r: r["over_first"], ".3f"),
)


def read_losses(path: str) -> dict[int, float]:
    """step -> logged loss (NaN or inf where the step's loss was not finite) of a workdir or a
    metrics.jsonl file. A resumed run logs steps past its checkpoint again; the later row is the
    run's."""
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no metrics.jsonl; pass a train.py workdir or the file")
    losses = {}
    with open(file) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed while writing it
                continue
            if isinstance(row, dict) and isinstance(row.get("loss"), int | float) and "step" in row:
                losses[row["step"]] = float(row["loss"])
    if not losses:
        raise ValueError(f"{file}: no logged losses yet (train.py logs every config.log_every)")
    return losses


def windows(steps: list[int], spec: str = "") -> list[tuple[int, int]]:
    """(first, last) step of each window holding some of `steps`: `spec` as 'A-B,C-D' (each must
    hold one), or by default WINDOW_ENDS of the last step (empty ones left out)."""
    if not spec:
        ends = [round(f * steps[-1]) for f in WINDOW_ENDS]
        spans = [(lo + 1, hi) for lo, hi in zip([0, *ends[:-1]], ends, strict=True)]
        return [(lo, hi) for lo, hi in spans if any(lo <= s <= hi for s in steps)]
    spans = []
    for window in spec.split(","):
        bounds = window.split("-")
        if len(bounds) != 2 or not all(b.strip().isdigit() for b in bounds):
            raise ValueError(f"--windows {spec!r}: write them as FIRST-LAST,... steps")
        lo, hi = map(int, bounds)
        if not any(lo <= s <= hi for s in steps):
            raise ValueError(
                f"--windows: {window} holds none of the steps every run logged "
                f"({steps[0]} to {steps[-1]}); choose windows within them"
            )
        spans.append((lo, hi))
    return spans


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def compare(
    curves: dict[str, dict[int, float]], common: list[int], spans, after: int
) -> tuple[list, dict]:
    """(rows: each run's mean loss per window over `common`, the steps every run logged, and
    against the first run's; per other run: after step `after`, how many of those steps it sits
    above the first, the largest gap and its last loss)."""
    names = list(curves)
    first = curves[names[0]]
    rows = []
    for lo, hi in spans:
        steps = [s for s in common if lo <= s <= hi]
        means = {name: _mean([curves[name][s] for s in steps]) for name in names}
        base = means[names[0]]
        for name in names:
            rows.append(
                {
                    "window": f"{lo}-{hi}",
                    "impl": name,  # the plots group bars by "impl"
                    "mean_loss": means[name],
                    "minus_first": means[name] - base,
                    "over_first": means[name] / base if base else math.nan,
                    "status": "ok",
                }
            )
    later = [s for s in common if s > after]
    summary = {}
    for name in names[1:]:
        curve = curves[name]
        gaps = [curve[s] - first[s] for s in later if math.isfinite(curve[s] - first[s])]
        summary[name] = {
            "after_step": after,
            "above_first": f"{sum(g > 0 for g in gaps)} of {len(gaps)}",
            "largest_gap": max(gaps, key=abs) if gaps else None,
            "last_loss": curve[common[-1]],
        }
    return rows, summary


def ascii_plot(a: dict[int, float], b: dict[int, float], rows: int = 12, cols: int = 80) -> str:
    """Two curves on a log loss axis: '.' a, 'x' b, '#' both in one cell."""
    steps = [s for s in sorted(set(a) & set(b)) if math.isfinite(a[s]) and math.isfinite(b[s])]
    if not steps:
        return "(no step where both losses are finite: nothing to plot)"

    def log(loss: float) -> float:
        return math.log(max(loss, 1e-30))  # a loss of exactly 0 plots lowest

    values = [c[s] for c in (a, b) for s in steps]
    top, bottom = log(max(values)), log(min(values))
    height, width = max(top - bottom, 1e-12), max(steps[-1] - steps[0], 1)
    grid = [[" "] * cols for _ in range(rows)]
    for curve, mark in ((a, "."), (b, "x")):
        for s in steps:
            col = round((s - steps[0]) / width * (cols - 1))
            row = round((top - log(curve[s])) / height * (rows - 1))
            grid[row][col] = mark if grid[row][col] in (" ", mark) else "#"
    lines = []
    for r, cells in enumerate(grid):
        label = f"{math.exp(top - r * height / (rows - 1)):.4f}" if r % 3 == 0 else ""
        lines.append(f"{label:>7} |" + "".join(cells).rstrip())
    lines.append(" " * 8 + "+" + "-" * cols)
    lines.append(f"{'':8} step {steps[0]} to {steps[-1]}; loss (log scale)")
    return "\n".join(lines)


def _named(run: str) -> tuple[str, str]:
    """NAME=PATH, or a PATH (which may itself hold '=') named after itself."""
    if "=" in run and not os.path.exists(run):
        name, path = run.split("=", 1)
        return name, path
    return run.rstrip("/"), run


def run_curves(args) -> dict:
    named = [_named(run) for run in args.runs]
    names = [name for name, _ in named]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"two runs named {twice[0]!r}; tell them apart as NAME=WORKDIR")
    curves = {name: read_losses(path) for name, path in named}
    if len(curves) < 2:
        raise ValueError(
            "curves needs at least two runs (NAME=WORKDIR or WORKDIR), the baseline first"
        )
    common = sorted(set.intersection(*(set(c) for c in curves.values())))
    if not common:
        raise ValueError("the runs share no logged step; log them with the same config.log_every")
    after = args.after if args.after is not None else round(common[-1] / 4)
    if after >= common[-1]:
        raise ValueError(
            f"--after {after}: the last step every run logged is {common[-1]}; choose a "
            "step before it"
        )
    rows, summary = compare(curves, common, windows(common, args.windows), after)
    print(f"Compared: steps {common[0]} to {common[-1]}, the {len(common)} every run logged")
    for name, curve in curves.items():
        bad = [s for s in sorted(curve) if not math.isfinite(curve[s])]
        if name in summary:  # where a compared run's loss stopped being finite
            summary[name]["not_finite_from"] = bad[0] if bad else None
        if bad:
            print(f"{name}: loss not finite at {len(bad)} logged steps from step {bad[0]} on")
    (first, a), (second, b) = list(curves.items())[:2]
    late = [s for s in common if s > after]
    print(ascii_plot({s: a[s] for s in late}, {s: b[s] for s in late}))
    print(f"'.' {first}, 'x' {second}, '#' both")
    return {"rows": rows, "ratios": summary}  # "ratios": what the CLI prints above the table
