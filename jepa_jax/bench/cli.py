"""The command line: parse_args, MODES (mode -> run function and table columns) and main."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from jepa_jax.bench import plot
from jepa_jax.bench.attention import ATTENTION_COLUMNS, run_attention
from jepa_jax.bench.breakdown import BREAKDOWN_COLUMNS, run_breakdown
from jepa_jax.bench.common import format_table
from jepa_jax.bench.compiled import COMPILED_COLUMNS, GPUS, run_compiled
from jepa_jax.bench.curves import CURVES_COLUMNS, run_curves
from jepa_jax.bench.max_batch import MAX_BATCH_COLUMNS, run_max_batch
from jepa_jax.bench.profile import PROFILE_COLUMNS, run_profile
from jepa_jax.bench.train import TRAIN_COLUMNS, _child_main, run_train

ATTENTION_IMPLS = ("cudnn", "xla", "reference")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    # The package docstring (jepa_jax/bench/__init__.py) holds the usage; its first line is this.
    description = sys.modules[__package__].__doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m jepa_jax.bench", description=description)
    modes = parser.add_subparsers(dest="mode", required=True)
    att = modes.add_parser(
        "attention", help="attention kernels alone: time, TFLOP/s, memory, error"
    )
    att.add_argument("--impls", default="reference,xla,cudnn")
    att.add_argument("--shapes", default="256x196x12x64,128x69x16x80", help="BxTxNxH,...")
    att.add_argument("--dtype", default="bfloat16")
    att.add_argument("--kv-lengths", action="store_true", help="random kv lengths in [T/2, T]")
    att.add_argument("--reps", type=int, default=20)
    att.add_argument("--warmup", type=int, default=3)
    for name, preset, impls, what in (
        ("train", "vit_b16", "cudnn,xla,reference", "img/s, MFU, memory"),
        ("max-batch", "vit_h14", "cudnn,xla", "the largest batch that fits"),
        ("breakdown", "vit_h14", "cudnn", "each part timed alone"),
        ("profile", "vit_h14", "cudnn", "its GPU kernels traced"),
        ("compiled", "vit_h14", "cudnn", "compiled for a GPU model, no GPU needed: its kernels"),
    ):
        p = modes.add_parser(name, help=f"the real trainer step: {what}")
        p.add_argument(
            "--config",
            default=preset,
            help="PATH:PRESET as train.py takes it, or a preset of configs/default.py; override "
            "fields as train.py does: --config.model.remat=True",
        )
        p.add_argument("--impls", default=impls)
    train, search = modes.choices["train"], modes.choices["max-batch"]
    for p in (train, search):  # the modes that measure in subprocesses
        p.add_argument("--child-timeout", type=float, default=1200.0, help="seconds per subprocess")
    parts, profile = modes.choices["breakdown"], modes.choices["profile"]
    compiled = modes.choices["compiled"]
    parts.add_argument("--reps", type=int, default=10)
    for p in (parts, profile, compiled):
        p.add_argument("--per-device-batch", type=int, default=128)
    compiled.add_argument("--gpu", choices=tuple(GPUS), default="h100", help="compile for")
    compiled.add_argument("--gpus", type=int, default=1, help="GPUs per host")
    compiled.add_argument("--hosts", type=int, default=1, help="hosts (processes), one mesh")
    compiled.add_argument("--top", type=int, default=30, help="kernel groups listed per impl")
    compiled.add_argument("--hlo-dir", help="also write each impl's compiled HLO here")
    profile.add_argument("--steps", type=int, default=3, help="traced steps")
    profile.add_argument("--warmup", type=int, default=3, help="untraced steps after the first")
    profile.add_argument("--top", type=int, default=25, help="kernel groups listed per impl")
    profile.add_argument("--trace-dir", default="bench_trace", help="where the traces stay")
    profile.add_argument(
        "--by",
        choices=("group", "kernel"),
        default="group",
        help="group kernels by name with digits masked, or list each kernel with its fusion's ops",
    )
    train.add_argument("--per-device-batch", type=int, default=128)
    train.add_argument("--steps", type=int, default=20, help="timed steps")
    train.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    train.add_argument("--peak-tflops", type=float, default=989.0, help="per device, H100 bf16")
    train.add_argument("--_child", help=argparse.SUPPRESS)  # internal: one measurement -> PATH
    search.add_argument("--start", type=int, default=128, help="first per-device batch")
    search.add_argument("--max-tries", type=int, default=7, help="subprocesses per impl")
    search.add_argument("--multiple", type=int, default=8, help="bisect to multiples of this")
    search.add_argument("--steps", type=int, default=3, help="timed steps per try (0: none)")
    curves = modes.add_parser("curves", help="loss curves of runs compared by window")
    curves.add_argument(
        "runs", nargs="+", help="NAME=WORKDIR or WORKDIR (or metrics.jsonl); the first: baseline"
    )
    curves.add_argument("--windows", default="", help="FIRST-LAST,... (default: 8ths, quarters)")
    curves.add_argument("--after", type=int, help="compare steps after this (default: a quarter)")
    for name, p in modes.choices.items():
        p.add_argument("--out", help="JSON path (default bench_<mode>.json)")
        if name in plot.PLOTS:
            p.add_argument("--plot", help="also draw the comparison to this PNG (needs matplotlib)")
    args, extra = parser.parse_known_args(argv)
    # train.py's overrides, --config.FIELD=VALUE (or --config.FIELD VALUE), pass through whole.
    args.overrides, rest = [], list(extra)
    while rest:
        item = rest.pop(0)
        if not item.startswith("--config.") or args.mode in ("attention", "curves"):
            parser.error(f"unrecognized argument {item!r}")
        if "=" not in item and rest and not rest[0].startswith("--"):
            item = f"{item}={rest.pop(0)}"
        args.overrides.append(item)
    if args.mode == "curves":
        return args
    allowed = ATTENTION_IMPLS if args.mode == "attention" else ATTENTION_IMPLS + ("auto",)
    bad = [i for i in args.impls.split(",") if i not in allowed]
    if bad:
        parser.error(f"--impls: unknown {bad}; choose from {','.join(allowed)}")
    return args


MODES = {
    "attention": (run_attention, ATTENTION_COLUMNS),
    "train": (run_train, TRAIN_COLUMNS),
    "max-batch": (run_max_batch, MAX_BATCH_COLUMNS),
    "breakdown": (run_breakdown, BREAKDOWN_COLUMNS),
    "profile": (run_profile, PROFILE_COLUMNS),
    "compiled": (run_compiled, COMPILED_COLUMNS),
    "curves": (run_curves, CURVES_COLUMNS),
}


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Run one mode, write its JSON, print the ratios and then the table; returns the result."""
    args = parse_args(argv)
    if getattr(args, "_child", None):
        _child_main(args)
        return None
    args.plot = getattr(args, "plot", None)  # modes without a chart take no --plot
    if args.plot:
        plot.require_matplotlib()
    run, columns = MODES[args.mode]
    result = {
        "mode": args.mode,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
    }
    result.update(run(args))
    out = args.out or f"bench_{args.mode}.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    if args.plot:
        plot.plot(result, args.plot)
        print(f"wrote {args.plot}")
    for shape, ratios in result["ratios"].items():
        print(f"{shape}: {json.dumps(ratios)}")
    print(format_table(result["rows"], columns), flush=True)
    return result
