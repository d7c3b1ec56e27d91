"""A run's running totals and its non-finite-step policy.

Each step's metrics say how many images were substituted and whether its loss or gradient norm
was non-finite (the step then changed nothing). The totals are summed on device, one tiny jitted
update per step with no host sync; the host reads them only when it logs or saves, and that is
when `config.on_nan` is enforced: `stop` ends the run once `config.max_nonfinite_steps` steps in a
row were non-finite, `skip` goes on, counting them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SAVED = ("bad_images", "skipped_steps")  # checkpointed with the state
ON_NAN = ("stop", "skip")
_WHAT = {1: "the loss", 2: "the gradient norm", 3: "the loss and the gradient norm"}


class NonFiniteError(RuntimeError):
    """The run stopped under config.on_nan=stop; the message says when, what and what to do."""


@jax.jit
def _add(totals: dict, metrics: dict, step: jax.Array, limit: int) -> dict:
    bad = metrics["nonfinite"] > 0
    streak = jnp.where(bad, totals["streak"] + 1, 0)
    first_stop = (totals["stop_step"] < 0) & (streak >= limit)
    return {
        "bad_images": totals["bad_images"] + metrics["bad_images"].astype(jnp.int32),
        "skipped_steps": totals["skipped_steps"] + bad.astype(jnp.int32),
        "streak": streak,
        "stop_step": jnp.where(first_stop, step, totals["stop_step"]),
        "what": jnp.where(bad & (totals["stop_step"] < 0), metrics["nonfinite"], totals["what"]),
    }


class RunTotals:
    """Running totals over the whole run (resumed from a checkpoint's `saved` values)."""

    def __init__(self, config, saved: dict[str, int] | None = None):
        self.on_nan = config.get("on_nan", "stop")
        self.limit = int(config.get("max_nonfinite_steps", 3))
        values = {k: (saved or {}).get(k, 0) for k in SAVED}
        values.update(streak=0, stop_step=-1, what=0)
        self._values = {k: jnp.asarray(v, jnp.int32) for k, v in values.items()}
        self._on_host = None  # the values fetched since the last add: one sync per step at most

    def add(self, metrics: dict, step: int) -> None:
        """Count one step's metrics (`step`: the number of steps done after it); no host sync."""
        self._values = _add(self._values, metrics, jnp.int32(step), self.limit)
        self._on_host = None

    def _host(self) -> dict:
        if self._on_host is None:
            self._on_host = jax.device_get(self._values)
        return self._on_host

    def read(self) -> dict[str, int]:
        """The saved totals, on the host (a sync: call it when logging or saving)."""
        values = self._host()
        return {k: int(values[k]) for k in SAVED}

    def check(self, last_checkpoint: str | None) -> None:
        """Raise NonFiniteError if config.on_nan=stop and a non-finite streak reached the limit."""
        values = self._host()
        stop_step = int(values["stop_step"])
        if self.on_nan != "stop" or stop_step < 0:
            return
        kept = (
            f"the last checkpoint ({last_checkpoint}) is kept"
            if last_checkpoint
            else ("no checkpoint was written")
        )
        raise NonFiniteError(
            f"{_WHAT.get(int(values['what']), 'the loss')} was not finite for {self.limit} steps "
            f"in a row, up to step {stop_step} (each was skipped); stopped without saving, "
            f"{kept}. Lower config.optim.lr or check the data, or set config.on_nan=skip to skip "
            "such steps and go on (config.max_nonfinite_steps sets the limit)"
        )
