"""`max-batch` mode: the largest per-device batch that fits, found by growing and bisecting, one
subprocess per try, each timing `--steps` steps.

"Fits" means XLA compiled it and it ran: near the memory limit XLA rematerialises activations
on its own to stay under it, so each try also reports img/s, which shows what that costs."""

from __future__ import annotations

from jepa_jax.bench.common import _log, _note, _ratios
from jepa_jax.bench.train import _spawn

TRY_FIELDS = ("per_device_batch", "status", "reason", "compile_s", "peak_bytes", "img_per_s")


def max_batch_one(args, impl: str) -> tuple[dict, dict | None]:
    """Grow the per-device batch x2 from --start until OOM, then bisect; at most --max-tries."""
    tries: list[dict] = []
    env = None

    def attempt(batch: int) -> str:
        nonlocal env
        _log(f"max-batch: {impl} per-device batch {batch}")
        result = _spawn(args, impl, batch, steps=args.steps, warmup=1 if args.steps else 0)
        env = env or result["env"]
        r = result["row"]
        _log(f"  -> {r['status']}" + (f": {r['reason']}" if r.get("reason") else ""))
        xla_bytes = (r.get("xla_memory") or {}).get("total_bytes")
        tries.append({k: r.get(k) for k in TRY_FIELDS} | {"xla_total_bytes": xla_bytes})
        return r["status"]

    def midpoint(lo: int, hi: int) -> int:
        return (lo + hi) // 2 // args.multiple * args.multiple

    lo, hi, batch, status = 0, None, args.start, "ok"  # lo runs, hi ran out of memory
    while status == "ok" and len(tries) < args.max_tries:
        status = attempt(batch)
        if status == "ok":
            lo, batch = batch, batch * 2
        elif status == "oom":
            hi = batch
    while status in ("ok", "oom") and hi is not None and len(tries) < args.max_tries:
        if midpoint(lo, hi) <= lo:
            break
        batch = midpoint(lo, hi)
        status = attempt(batch)
        lo, hi = (batch, hi) if status == "ok" else (lo, batch)
    failure = next((t for t in tries if t["status"] not in ("ok", "oom")), None)
    resolved = hi is not None and midpoint(lo, hi) <= lo
    devices = (env or {}).get("devices")
    row = {
        "impl": impl,
        "status": failure["status"] if failure else "ok",
        "reason": failure["reason"]
        if failure
        else (None if resolved else "stopped at --max-tries"),
        "max_per_device_batch": lo,
        "img_per_s_at_max": next(
            (t["img_per_s"] for t in tries if t["per_device_batch"] == lo), None
        ),
        "global_batch": lo * devices if devices else None,
        "smallest_oom_per_device_batch": hi,
        "resolved": resolved,
        "tries": tries,
    }
    return row, env


def run_max_batch(args) -> dict:
    rows, env = [], None
    for impl in args.impls.split(","):
        row, found = max_batch_one(args, impl)
        rows.append(row)
        env = env or found
    return {"env": env, "rows": rows, "ratios": _ratios(rows, ("max_per_device_batch",))}


MAX_BATCH_COLUMNS = (
    ("impl", lambda r: r["impl"], ""),
    ("max per-device batch", lambda r: r["max_per_device_batch"], ""),
    ("global", lambda r: r.get("global_batch"), ""),
    ("img/s there", lambda r: r.get("img_per_s_at_max"), ".1f"),
    ("smallest OOM", lambda r: r.get("smallest_oom_per_device_batch"), ""),
    ("tries", lambda r: len(r["tries"]), ""),
    ("status", _note, ""),
)
