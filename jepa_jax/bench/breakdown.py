"""`breakdown` mode: each part of the training step jitted and timed alone, in-process."""

from __future__ import annotations

import functools
import statistics
import time

from jepa_jax.bench.common import _environment, real_step_inputs
from jepa_jax.flops import step_flops_by_part


def _median_ms(fn, *args, reps: int) -> float:
    """Median wall time of a jitted call (after one untimed call that compiles it)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def breakdown_rows(args, impl: str) -> list[dict]:
    """Time each part of the step alone (jitted separately, so fusion across parts is lost)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jepa_jax import data, objective, optim, trainer

    config, _, net, state, tx, spec, batch = real_step_inputs(args, impl)
    images = jax.jit(data.normalize)(batch["images"])

    def context_forward(p, b):
        return nnx.merge(net.encoder, p)(images, b["context_idx"])

    def context_loss(p, b):
        return context_forward(p, b).astype(jnp.float32).mean()

    def target_features(target, b):
        return objective.target_features(net, target, images, b["target_idx"])

    def predictor_loss(p, ctx, b):
        out = nnx.merge(net.predictor, p)(ctx, b["context_idx"], b["target_idx"], b["target_len"])
        return out.astype(jnp.float32).mean()

    def update(s, grads):
        updates, _ = tx.update(grads, s.opt_state, s.params)
        params = optax.apply_updates(s.params, updates)
        return params, optim.ema_update(s.target, params["encoder"], 0.99)

    ctx = jax.jit(context_forward)(state.params["encoder"], batch)
    grads = jax.tree.map(jnp.ones_like, state.params)
    step = jax.jit(
        functools.partial(trainer.train_step, net=net, tx=tx, sched=optim.schedules(config))
    )
    flops = step_flops_by_part(config, spec)
    parts = (
        (
            "target encoder fwd",
            flops["target"],
            jax.jit(target_features),
            (state.target, batch),
        ),
        (
            "context encoder fwd+bwd",
            flops["context"],
            jax.jit(jax.grad(context_loss)),
            (state.params["encoder"], batch),
        ),
        (
            "predictor fwd+bwd",
            flops["predictor"],
            jax.jit(jax.grad(predictor_loss, argnums=(0, 1))),
            (state.params["predictor"], ctx, batch),
        ),
        ("adamw + ema", 0.0, jax.jit(update), (state, grads)),
        ("whole step", sum(flops.values()), step, (state, batch)),
    )
    rows = []
    for name, part_flops, fn, fn_args in parts:
        ms = _median_ms(fn, *fn_args, reps=args.reps)
        achieved = part_flops * config.batch_size / (ms / 1e3)
        rows.append({"impl": impl, "part": name, "ms": ms, "tflops_per_s": achieved / 1e12 or None})
    return rows


def run_breakdown(args) -> dict:
    rows = [row for impl in args.impls.split(",") for row in breakdown_rows(args, impl)]
    return {"env": _environment(), "rows": rows, "ratios": {}}


BREAKDOWN_COLUMNS = (
    ("impl", lambda r: r["impl"], ""),
    ("part", lambda r: r["part"], ""),
    ("ms", lambda r: r["ms"], ".2f"),
    ("TFLOP/s", lambda r: r["tflops_per_s"], ".0f"),
)
