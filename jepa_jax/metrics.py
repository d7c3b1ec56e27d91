"""What a run reports and where, on process 0: the startup summary; every `log_every` steps a
line on stdout (scrolling above a live progress bar on an interactive terminal), a row of
WORKDIR/metrics.jsonl, TensorBoard scalars in WORKDIR/tensorboard and, when asked for and
installed, Weights & Biases; then the closing summary.

The first step of a run compiles. It is timed apart (one sync, once), so img/s, the ETA and the
bar's rate come from the steps after it.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from jepa_jax import attention as attention_lib
from jepa_jax import summary

# Dense bf16 peak FLOP/s per device by device_kind substring (first match), for MFU.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("B200", 2250e12),
)


def peak_flops(device_kind: str) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None where it is not in PEAK_FLOPS."""
    return next((peak for name, peak in PEAK_FLOPS if name in device_kind), None)


class Pace:
    """Steps and seconds of a run, with its first (compiling) step set apart.

    `compiled(step, now)` marks when that first step was known to be finished; steady-state
    seconds per step and the ETA count only the steps after it.
    """

    def __init__(self, first_step: int, now: float):
        self.start = (first_step, now)
        self.first: tuple[int, float] | None = None  # (step, time) when step 1 of the run ended
        self.last = self.start  # the last logged (step, time)

    def compiled(self, step: int, now: float) -> None:
        if self.first is None:
            self.first = (step, now)

    @property
    def first_step_s(self) -> float | None:
        return None if self.first is None else self.first[1] - self.start[1]

    def step_seconds(self, step: int, now: float) -> float | None:
        """Steady-state seconds per step, from the end of the first step to `step` at `now`."""
        if self.first is None or step <= self.first[0]:
            return None
        return (now - self.first[1]) / (step - self.first[0])

    def steady_seconds(self) -> float | None:
        """Seconds per step up to the last log (saves and shutdown after it not counted)."""
        return self.step_seconds(*self.last)

    def eta(self, step: int, total: int, now: float) -> datetime.timedelta | None:
        seconds = self.step_seconds(step, now)
        if seconds is None:
            return None
        return datetime.timedelta(seconds=round((total - step) * seconds))

    def interval(self, step: int, now: float) -> tuple[int, float]:
        """(steps, seconds) since the last log; the compiling step only when alone in it."""
        s0, t0 = self.last
        if self.first is not None and s0 < self.first[0] < step:
            s0, t0 = self.first
        self.last = (step, now)
        return step - s0, now - t0


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: where torch is installed,
    tensorboardX imports it (1.3 s at every start, measured) only to accept torch tensors, and
    this writer is only given floats, text and numpy arrays."""
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which it handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter


class TensorBoard:
    """Event files in `logdir` (tensorboardX); a resumed run hides the old rows past its start."""

    def __init__(self, logdir: str, first_step: int, say):
        try:
            SummaryWriter = _summary_writer_class()
        except ImportError:
            say("TensorBoard: tensorboardX is not installed (pip install tensorboardX); skipped")
            self.writer = None
            return
        # purge_step: TensorBoard drops earlier events at or past it, logged before a resume.
        self.writer = SummaryWriter(logdir, purge_step=first_step or None, flush_secs=30)

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)

    def text(self, step: int, texts: dict[str, str]) -> None:
        if self.writer:
            for tag, text in texts.items():
                # Indented: TensorBoard renders text as Markdown, and this keeps it verbatim.
                self.writer.add_text(tag, "\n".join("    " + ln for ln in text.splitlines()), step)

    def image(self, step: int, tag: str, picture: np.ndarray) -> None:
        if self.writer:
            self.writer.add_image(tag, picture, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None


def _wandb_run(config, workdir: str, say):
    """A Weights & Biases run when config.wandb.project is set and wandb is installed."""
    project = (config.get("wandb") or {}).get("project")
    if not project:
        return None
    try:
        import wandb
    except ImportError:
        say(
            f"W&B: config.wandb.project={project!r} but wandb is not installed "
            "(pip install wandb); skipped"
        )
        return None
    name = os.path.basename(os.path.normpath(workdir))
    return wandb.init(project=project, name=name, dir=workdir, config=config.to_dict())


def _progress_bar(stream, first: int, total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total,
        initial=first,
        file=stream,
        dynamic_ncols=True,
        unit="step",
        bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}",  # ", loss ..."
    )


class MetricsWriter:
    """A run's reports (see the module docstring); every method is a no-op off process 0.

    `stream` is where lines go (stdout); a progress bar is drawn there when it is a terminal.
    """

    def __init__(self, workdir: str, config, *, first_step: int = 0, stream=None, clock=None):
        self.enabled = jax.process_index() == 0
        self.workdir, self.config = workdir, config
        self.total_steps, self.batch_size = config.total_steps, config.batch_size
        self.first_step = first_step
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.stream = stream or sys.stdout
        self._clock = clock or time.perf_counter
        self.pace = Pace(first_step, self._clock())
        self.flops_per_image: float | None = None  # set by startup() on a known GPU: MFU
        self._peak: float | None = None  # peak FLOP/s of all devices together, with it
        self.last_loss: tuple[int, float] | None = None
        self._shown: dict[str, Any] = {}
        self.bar = self.tensorboard = self.wandb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.tensorboard = TensorBoard(os.path.join(workdir, "tensorboard"), first_step, self.say)
        self.wandb = _wandb_run(config, workdir, self.say)

    def say(self, line: str) -> None:
        """One line on the console (above the progress bar while there is one)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def startup(self, mesh, net, state) -> None:
        """Print the startup summary; to TensorBoard: it, the config, and the first masks."""
        if not self.enabled:
            return
        num_images, picture = summary.first_batch_view(self.config, self.first_step)
        lines = summary.startup_lines(self.config, self.workdir, mesh, net, state, num_images)
        for line in lines:
            self.say(line)
        self._set_flops(mesh)
        step = self.first_step
        attention = attention_lib.describe(net.attention, net.layer_counts) + "\n"
        for impl, why_not in attention_lib.status().items():
            attention += f"\n{impl}: {'runs here' if why_not is None else why_not}"
        texts = {"startup": "\n".join(lines), "config": str(self.config), "attention": attention}
        self.tensorboard.text(step, texts)
        self.tensorboard.image(step, "masks", picture)
        if self.wandb:
            import wandb

            self.wandb.log({"masks": wandb.Image(picture)}, step=step)

    def _set_flops(self, mesh) -> None:
        device = mesh.devices.flat[0]
        if device.platform != "gpu" or self.config.model.dtype not in ("bfloat16", "float16"):
            return
        peak = peak_flops(device.device_kind)
        if peak:
            from jepa_jax import masks
            from jepa_jax.flops import flops_per_image

            spec = masks.mask_spec(self.config)
            self.flops_per_image = flops_per_image(self.config, spec)
            self._peak = peak * mesh.size

    def tick(self, step: int, metrics: dict) -> None:
        """After each step (`step` steps done): time the first step apart, move the bar."""
        if not self.enabled:
            return
        if self.pace.first is None:
            jax.block_until_ready(metrics)  # once: the first step, compilation included, ends
            self.pace.compiled(step, self._clock())
        if self.bar is None and self.stream.isatty():
            self.bar = _progress_bar(self.stream, self.first_step, self.total_steps)
        self._refresh_bar(step)

    def _refresh_bar(self, step: int) -> None:
        if self.bar is not None:
            eta = self.pace.eta(step, self.total_steps, self._clock())
            shown = [f"{k} {v:.4g}" for k, v in self._shown.items()]
            shown += [f"eta {eta}"] if eta is not None else []
            self.bar.set_postfix_str(", ".join(shown), refresh=False)
            self.bar.update(step - self.bar.n)  # redraws at most every 0.1 s

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Log fetched metrics after `step` steps; adds img_per_s (and mfu where known)."""
        if not self.enabled:
            return
        now = self._clock()
        steps, seconds = self.pace.interval(step, now)
        metrics = dict(metrics)
        metrics["img_per_s"] = steps * self.batch_size / seconds if seconds > 0 else 0.0
        if self.flops_per_image:
            metrics["mfu"] = self.flops_per_image * metrics["img_per_s"] / self._peak
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.tensorboard.scalars(step, metrics)
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if "loss" in metrics:
            self.last_loss = (step, metrics["loss"])
            self._shown["loss"] = metrics["loss"]
        self._shown["img/s"] = metrics["img_per_s"]
        eta = self.pace.eta(step, self.total_steps, now)
        order = sorted(metrics, key=lambda k: k != "loss")  # the loss first, then as given
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in order)
        when = f" (eta {eta})" if eta is not None else ""
        self.say(f"step {step}/{self.total_steps}{when}: {shown}")
        self._refresh_bar(step)

    def finish(self, done: int, checkpoint: str | None, stopped: str | None = None) -> None:
        """Print the closing summary (after close(): below the progress bar, not in it)."""
        if not self.enabled:
            return
        now = self._clock()
        self.close()
        lines = summary.closing_lines(
            self.config,
            self.workdir,
            first=self.first_step,
            done=done,
            wall_s=now - self.pace.start[1],
            first_step_s=self.pace.first_step_s,
            step_s=self.pace.steady_seconds(),
            last_loss=self.last_loss,
            checkpoint=checkpoint,
            stopped=stopped,
        )
        for line in lines:
            self.say(line)

    def close(self) -> None:
        """Close the bar, flush and close TensorBoard and W&B; safe to call more than once."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def truncate(self, step: int) -> None:
        """Keep only rows up to `step`, the run's restart point: every step is then logged once."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a crash mid-write
        if len(keep) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)  # atomic: a crash here leaves the old or the new file
