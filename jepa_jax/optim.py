"""AdamW and I-JEPA's schedules (LR, weight decay, EMA momentum), each a pure function of step.

Pure schedules make resume exact by construction: nothing is replayed, the step says it all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array | int], jax.Array]
# Decay only weight matrices (and the mask token), as the release did; biases and norms are exempt.
DECAYED_NAMES = ("kernel", "mask_token")


def _cosine(start: float, end: float, progress) -> jax.Array:
    return end + (start - end) * 0.5 * (1 + jnp.cos(jnp.pi * progress))


def _progress(step, begin: int, end: int) -> jax.Array:
    return jnp.clip((jnp.asarray(step, jnp.float32) - begin) / max(end - begin, 1), 0.0, 1.0)


def learning_rate(optim, total_steps: int) -> Schedule:
    """Linear warmup start_lr -> lr over warmup_steps, then cosine to final_lr at total_steps."""
    warmup = optim.warmup_steps

    def schedule(step):
        warm = optim.start_lr + (optim.lr - optim.start_lr) * _progress(step, 0, warmup)
        decay = _cosine(optim.lr, optim.final_lr, _progress(step, warmup, total_steps))
        return jnp.where(jnp.asarray(step) < warmup, warm, decay)

    return schedule


def weight_decay(optim, total_steps: int) -> Schedule:
    """Cosine rise from weight_decay[0] to weight_decay[1] over the run."""
    start, end = optim.weight_decay
    return lambda step: _cosine(start, end, _progress(step, 0, total_steps))


def ema_momentum(optim, total_steps: int) -> Schedule:
    """Linear from ema[0] to ema[1] over the run."""
    start, end = optim.ema
    return lambda step: start + (end - start) * _progress(step, 0, total_steps)


@dataclasses.dataclass(frozen=True)
class Schedules:
    lr: Schedule
    wd: Schedule
    momentum: Schedule


def schedules(config) -> Schedules:
    return Schedules(
        learning_rate(config.optim, config.total_steps),
        weight_decay(config.optim, config.total_steps),
        ema_momentum(config.optim, config.total_steps),
    )


def decay_mask(params) -> object:
    """A pytree of bools: True where weight decay applies (by parameter name, not rank: stacked
    blocks make biases 2-D)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", path[-1])) in DECAYED_NAMES, params
    )


def optimizer(config, params) -> optax.GradientTransformation:
    """AdamW whose LR and weight decay follow the schedules (kept in the state for logging)."""
    s = schedules(config)
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=s.lr,
        weight_decay=s.wd,
        b1=config.optim.b1,
        b2=config.optim.b2,
        eps=config.optim.eps,
        mask=decay_mask(params),
    )


def ema_update(target, online, momentum: jax.Array):
    """target <- m * target + (1 - m) * online, leaf by leaf."""
    return jax.tree.map(lambda t, o: momentum * t + (1 - momentum) * o, target, online)
