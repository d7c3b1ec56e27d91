"""What the bench modes share: configs read as train.py reads them (--config.FIELD=VALUE
overrides), failure classification, XLA's memory estimate, the environment, cudnn/other ratios,
text tables and logging."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

# The repo root, where configs/ lives: three levels up from jepa_jax/bench/common.py.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "default.py")
OOM_MARKERS = ("resource_exhausted", "out of memory", "outofmemory")


def load_config(config: str, overrides: Sequence[str] = ()):
    """A config as train.py reads it: `config` is its --config (PATH:PRESET), or a bare preset
    of the repository's configs/default.py; `overrides` are its `--config.FIELD=VALUE` flags."""
    from absl import flags
    from ml_collections import config_flags

    if ":" not in config and not config.endswith(".py"):
        config = f"{DEFAULT_CONFIG}:{config}"
    argv = ["bench", f"--config={config}", *overrides]
    values = flags.FlagValues()
    # config_flags reads the overrides from the argv it is given (sys.argv by default).
    config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
    try:
        values(argv)
    except (flags.Error, KeyError, AttributeError) as e:
        raise ValueError(
            f"bad config override in {overrides} ({e}); they look like --config.model.remat=True"
        ) from None
    return values.config


class RealStep(NamedTuple):
    """The real training step's inputs for one attention implementation, on all local devices."""

    config: Any
    mesh: Any
    net: Any  # objective.Networks
    state: Any  # trainer.TrainState
    tx: Any  # the optax optimizer
    spec: Any  # masks.MaskSpec
    batch: dict  # synthetic uint8 images and sampled masks, sharded over the mesh


def step_config(args, impl: str, devices: int):
    """--config with its overrides, `impl` attention, --per-device-batch images per device."""
    config = load_config(args.config, args.overrides)
    config.model.attention = impl
    config.batch_size = args.per_device_batch * devices
    return config


def real_step_inputs(args, impl: str) -> RealStep:
    """The step's pieces for `step_config` on this machine's devices, state and batch made."""
    import jax
    import numpy as np

    from jepa_jax import data, masks, sharding, trainer

    config = step_config(args, impl, jax.device_count())
    mesh = sharding.make_mesh(config.mesh)
    net, state, tx = trainer.build(config, mesh)
    spec = masks.mask_spec(config)
    side = config.model.image_size
    images = np.random.default_rng(0).integers(0, 256, (config.batch_size, side, side, 3), np.uint8)
    batch = sharding.global_batch(mesh, data.synthetic_batch(config, spec, images, 0))
    return RealStep(config, mesh, net, state, tx, spec, batch)


def _is_oom(text: str) -> bool:
    """Whether an error's headline says the device ran out of memory (pass the first line:
    other errors can quote allocator logs further down)."""
    text = text.lower()
    return any(marker in text for marker in OOM_MARKERS)


def _describe(e: BaseException) -> str:
    """One line naming an exception, short enough for a table cell and a JSON field."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def _failure(e: BaseException) -> dict:
    """status (oom or error) and reason of a failed measurement."""
    reason = _describe(e)
    return {"status": "oom" if _is_oom(reason) else "error", "reason": reason}


def _memory(compiled) -> dict:
    """XLA's compile-time memory estimate per device; total = temp + argument + output - alias."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return {}
    m = m[0] if isinstance(m, list | tuple) else m
    if m is None:
        return {}
    got = {
        key: int(getattr(m, f"{key}_size_in_bytes", 0) or 0)
        for key in ("temp", "argument", "output", "alias")
    }
    got["total"] = got["temp"] + got["argument"] + got["output"] - got["alias"]
    return {f"{key}_bytes": value for key, value in got.items()}


def _environment() -> dict:
    import jax

    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        # The allocator's settings bound what fits (by default it takes 75% of GPU memory).
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("XLA_PYTHON_")},
    }


def _ratio(a, b) -> float | None:
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def _ratios(rows: list[dict], metrics: Sequence[str]) -> dict:
    """metric(cudnn) / metric(other) for other in xla, reference, where both rows ran."""
    ok = {r["impl"]: r for r in rows if r.get("status") == "ok"}
    if "cudnn" not in ok:
        return {}
    return {
        f"cudnn/{other}": {m: _ratio(ok["cudnn"].get(m), ok[other].get(m)) for m in metrics}
        for other in ("xla", "reference")
        if other in ok
    }


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if spec == "GiB":
        return f"{value / 2**30:.2f}"
    if spec == "MiB":
        return f"{value / 2**20:.1f}"
    return format(value, spec) if spec else str(value)


def format_table(rows: list[dict], columns: Sequence[tuple[str, Callable[[dict], object], str]]):
    """Rows as an aligned text table; each column is (header, getter, format spec)."""
    cells = [[h for h, _, _ in columns]]
    cells += [[_fmt(get(r), spec) for _, get, spec in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _note(row: dict) -> str:
    return row["status"] if not row.get("reason") else f"{row['status']}: {row['reason'][:90]}"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
