"""`--plot PATH`: a bench result as bar charts, one bar per implementation (cudnn, xla,
reference) in each group (a shape, a part of the step, a kernel kind). matplotlib is optional
(`pip install -e ".[plot]"`) and imported only here, only when a plot is asked for."""

from __future__ import annotations

from collections.abc import Callable

COLOURS = {"cudnn": "#2a9d8f", "xla": "#e9c46a", "reference": "#e76f51", "auto": "#264653"}
OTHER_COLOURS = ("#8d99ae", "#e76f51", "#2a9d8f", "#e9c46a", "#6d597a")  # curves: runs by order
GiB, MiB = 2**30, 2**20

Panel = tuple[str, Callable[[dict], float | None]]


def _get(key: str, scale: float = 1.0) -> Callable[[dict], float | None]:
    def get(row: dict) -> float | None:
        value = row.get(key)
        return None if value is None else value / scale

    return get


def _peak_gib(row: dict) -> float | None:
    peak = row.get("peak_bytes") or (row.get("xla_memory") or {}).get("total_bytes")
    return None if peak is None else peak / GiB


# mode -> (the group a row belongs to, panels: (title, value of a row))
PLOTS: dict[str, tuple[Callable[[dict], str], tuple[Panel, ...]]] = {
    "attention": (
        lambda r: "x".join(map(str, r["shape"])),
        (
            ("forward ms (lower is better)", _get("fwd_ms")),
            ("forward + backward ms", _get("fwd_bwd_ms")),
            ("fwd+bwd temporary MiB", _get("fwd_bwd_temp_bytes", MiB)),
        ),
    ),
    "train": (
        lambda r: f"batch {r.get('global_batch')}",
        (
            ("images/s (higher is better)", _get("img_per_s")),
            ("peak memory GiB", _peak_gib),
            ("compile s", _get("compile_s")),
        ),
    ),
    "max-batch": (
        lambda r: "",
        (
            ("largest per-device batch", _get("max_per_device_batch")),
            ("images/s at that batch", _get("img_per_s_at_max")),
        ),
    ),
    "breakdown": (lambda r: r["part"], (("ms per step (lower is better)", _get("ms")),)),
    "profile": (lambda r: r["kind"], (("kernel ms per step, by kind", _get("ms")),)),
    "curves": (  # one bar per run in each window of steps
        lambda r: r["window"],
        (("mean loss per window", _get("mean_loss")), ("over the first run", _get("over_first"))),
    ),
}


def require_matplotlib() -> None:
    """Stop early, before a long benchmark, if the plot could not be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib: pip install matplotlib (or the extra: pip install -e "
            '".[plot]")'
        ) from None


def _rows(result: dict) -> list[dict]:
    if result["mode"] == "profile":  # per impl: kernel time by kind, from the summaries
        return [
            {"impl": s["impl"], "kind": kind, "ms": ms, "status": "ok"}
            for s in result.get("summaries", [])
            for kind, ms in sorted(s["kernel_ms_by_kind"].items())
        ]
    return result["rows"]


def plot(result: dict, path: str) -> None:
    """Draw `result` (what `bench.main` returns and writes as JSON) to `path` (PNG, SVG, PDF)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    group_of, panels = PLOTS[result["mode"]]
    rows = _rows(result)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    groups = list(dict.fromkeys(group_of(r) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    width = 0.8 / max(len(impls), 1)
    for ax, (title, value) in zip(axes[0], panels, strict=True):
        for i, impl in enumerate(impls):
            for g, group in enumerate(groups):
                row = next((r for r in rows if r["impl"] == impl and group_of(r) == group), None)
                x = g + (i - (len(impls) - 1) / 2) * width
                v = value(row) if row and row.get("status", "ok") == "ok" else None
                if v is None:  # did not run here (unavailable, out of memory, error)
                    status = row.get("status", "n/a") if row else "n/a"
                    ax.text(
                        x, 0, f"{impl}: {status}", ha="center", va="bottom", rotation=90, fontsize=8
                    )
                    continue
                colour = COLOURS.get(impl, OTHER_COLOURS[i % len(OTHER_COLOURS)])
                ax.bar(x, v, width, color=colour, label=impl if g == 0 else None)
                ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(groups)), groups, fontsize=8, rotation=15 if len(groups) > 2 else 0)
        ax.margins(y=0.15)
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="upper right", fontsize=9)
    env = result.get("env") or {}
    where = f"{env.get('devices', '?')} x {env.get('device_kind', '?')}" if env else ""
    config = (result.get("args") or {}).get("config")
    what = f" {config}" if config and result["mode"] != "attention" else ""
    where = f": {where}" if where else ""
    fig.suptitle(f"python -m jepa_jax.bench {result['mode']}{what}{where}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.92, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
