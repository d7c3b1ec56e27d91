"""What a run reports: lines, ETA without compilation, metrics.jsonl, TensorBoard event files,
the progress bar on a terminal, the startup and closing summaries, MFU, W&B (faked)."""

import glob
import io
import json
import struct
import sys
import types

import numpy as np
import pytest

from configs.default import get_config
from jepa_jax import attention, kernels, metrics, sharding, summary


class Clock:
    """A settable clock: the writer's timing without waiting."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def read_events(logdir) -> list:
    """Every Event in the TensorBoard files under logdir (TFRecord: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(glob.glob(f"{logdir}/events.out.tfevents.*")):
        with open(path, "rb") as f:
            raw = f.read()
        at = 0
        while at < len(raw):
            (length,) = struct.unpack("<Q", raw[at : at + 8])
            event = event_pb2.Event()
            event.ParseFromString(raw[at + 12 : at + 12 + length])
            events.append(event)
            at += 12 + length + 4
    return events


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for e in read_events(logdir):
        for v in e.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def tiny_config(total_steps=30, log_every=10):
    config = get_config("tiny")
    config.total_steps, config.log_every = total_steps, log_every
    return config


def run_steps(writer, clock, first, last, *, compile_s=30.0, step_s=1.0, log_every=10):
    """Drive the writer as the trainer does: tick every step, write every log_every."""
    for done in range(first + 1, last + 1):
        clock.now += compile_s if done == first + 1 else step_s
        writer.tick(done, {"loss": np.float32(0.5)})
        if done % log_every == 0 or done == last:
            writer.write(done, {"loss": 1.0 / done, "lr": 1e-3, "bad_images": 0})


def test_pace_eta_and_rate_exclude_the_compiling_step():
    pace = metrics.Pace(first_step=0, now=0.0)
    pace.compiled(1, 30.0)  # the first step took 30 s: compilation
    assert pace.first_step_s == 30.0
    assert pace.step_seconds(10, 39.0) == pytest.approx(1.0)
    assert pace.eta(10, 30, 39.0).total_seconds() == 20
    assert pace.interval(10, 39.0) == (9, 9.0)  # steps 2..10, not the compiling one
    assert pace.interval(20, 49.0) == (10, 10.0)
    alone = metrics.Pace(first_step=5, now=0.0)
    alone.compiled(6, 30.0)
    assert alone.eta(6, 30, 30.0) is None  # no steady step seen yet
    assert alone.interval(6, 30.0) == (1, 30.0)  # a log at the first step: all it has


def test_lines_jsonl_and_tensorboard_scalars(tmp_path):
    clock, out = Clock(), io.StringIO()
    writer = metrics.MetricsWriter(str(tmp_path), tiny_config(), stream=out, clock=clock)
    run_steps(writer, clock, 0, 30)
    writer.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 10/30 (eta 0:00:20): loss=0.1 ")  # not 0:01:00
    assert "img_per_s=8 " in lines[0] + " "  # 9 steps x 8 images in 9 s: no compilation
    assert lines[-1].startswith("step 30/30 (eta 0:00:00)")
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[1]["img_per_s"] == pytest.approx(8.0)
    tb = scalars(tmp_path / "tensorboard")
    assert set(tb) == {"loss", "lr", "bad_images", "img_per_s"}
    assert [step for step, _ in tb["loss"]] == [10, 20, 30]
    assert [loss for _, loss in tb["loss"]] == pytest.approx([0.1, 0.05, 1 / 30])


def test_resume_truncates_and_purges_tensorboard(tmp_path):
    clock = Clock()
    config = tiny_config()
    first = metrics.MetricsWriter(str(tmp_path), config, stream=io.StringIO(), clock=clock)
    run_steps(first, clock, 0, 30)
    first.close()
    resumed = metrics.MetricsWriter(
        str(tmp_path), config, first_step=20, stream=io.StringIO(), clock=clock
    )
    resumed.truncate(20)
    run_steps(resumed, clock, 20, 30)
    resumed.close()
    assert [json.loads(ln)["step"] for ln in open(tmp_path / "metrics.jsonl")] == [10, 20, 30]
    starts = [e for e in read_events(tmp_path / "tensorboard") if e.HasField("session_log")]
    assert [e.step for e in starts] == [20]  # TensorBoard drops the first run's steps >= 20


def test_progress_bar_on_a_terminal_and_plain_lines_elsewhere(tmp_path):
    clock, term = Clock(), Terminal()
    writer = metrics.MetricsWriter(str(tmp_path / "a"), tiny_config(), stream=term, clock=clock)
    run_steps(writer, clock, 0, 30)
    writer.finish(30, checkpoint=None)
    screen = term.getvalue()
    assert "30/30, loss 0.03333, img/s 8, eta 0:00:00" in screen.replace("\r", "\n")
    assert "|" in screen and "100%" in screen  # the bar
    assert "step 10/30 (eta 0:00:20)" in screen  # the lines scroll above it
    plain = io.StringIO()
    writer = metrics.MetricsWriter(str(tmp_path / "b"), tiny_config(), stream=plain, clock=clock)
    run_steps(writer, clock, 0, 30)
    writer.close()
    assert "%|" not in plain.getvalue() and "\r" not in plain.getvalue()


def fake_run(config):
    """Mesh, networks and state as the trainer's, with shapes only (nothing compiled)."""
    mesh = sharding.make_mesh(config.mesh)
    choice = attention.Choice("auto", "reference", "cudnn unavailable: no CUDA GPU (JAX ...)")
    net = types.SimpleNamespace(
        attention=choice,
        layer_counts={"encoder": 12, "predictor": 2},
        fused_qkv=kernels.resolve("off", dtype="bfloat16", widths={}),
        gelu_kernel=kernels.resolve_gelu("off"),
    )
    encoder = {"w": np.zeros((192, 100)), "b": np.zeros(50)}
    state = types.SimpleNamespace(
        params={"encoder": encoder, "predictor": {"w": np.zeros((10, 10))}}, target=encoder
    )
    return mesh, net, state


def test_startup_summary_and_tensorboard_text_and_masks(tmp_path):
    config = tiny_config()
    out = io.StringIO()
    writer = metrics.MetricsWriter(str(tmp_path), config, stream=out)
    writer.startup(*fake_run(config))
    writer.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 8
    devices, data_line, params, attention_line, fused_line, gelu_line, checkpoints, logs = lines
    assert devices.startswith("Devices: ") and "mesh data " in devices
    assert "batch 8 global" in devices
    assert data_line == "Data: built-in procedural images, 1,024 images, 96 px crops"
    assert params.startswith("Parameters: encoder 19,250 (tiny, patch 16), predictor 100")
    # No GPU here: auto falling back is expected, not a warning.
    assert attention_line.startswith("Attention: reference in 14 attention layers")
    assert fused_line == "Fused q/k/v: off (config.model.fused_qkv=off)"
    assert gelu_line == "GELU: XLA (config.model.gelu_kernel=off)"
    assert checkpoints.endswith("checkpoints (every 1000 steps and at the end, keeping 3)")
    assert logs.endswith(f"tensorboard --logdir {tmp_path}/tensorboard")
    texts, images = {}, {}
    for e in read_events(tmp_path / "tensorboard"):
        for v in e.summary.value:
            if v.HasField("image"):
                images[v.tag] = v.image
            elif v.metadata.plugin_data.plugin_name == "text":
                texts[v.tag.split("/")[0]] = v.tensor.string_val[0].decode()
    assert {"startup", "config", "attention"} <= set(texts)
    assert "model:" in texts["config"] and "reference: runs here" in texts["attention"]
    assert images["masks"].width > images["masks"].height > 100


def test_attention_line_warns_only_with_a_gpu(monkeypatch):
    choice = attention.Choice("auto", "reference", "compute dtype float32: ...")
    layers = {"encoder": 1}
    assert not attention.startup_line(choice, layers).startswith("Warning")
    gpu = types.SimpleNamespace(platform="gpu")
    monkeypatch.setattr(attention.jax, "devices", lambda: [gpu])
    assert attention.startup_line(choice, layers).startswith("Warning: Attention: reference")
    assert not attention.startup_line(attention.Choice("auto", "cudnn"), layers).startswith("W")


def test_closing_summary(monkeypatch):
    config = tiny_config()
    monkeypatch.setattr(sys, "argv", ["train.py", "--workdir=runs/x", "--config.total_steps=30"])
    common = dict(wall_s=75.0, first_step_s=30.0, step_s=0.25, last_loss=(30, 0.25))
    done = summary.closing_lines(
        config,
        "runs/x",
        first=0,
        done=30,
        checkpoint="/abs/runs/x/checkpoints/30",
        stopped=None,
        **common,
    )
    assert done[0] == (
        "Done: 30 steps (step 0 -> 30) in 0:01:15 (first step with compilation 30.0 s, then "
        "0.25 s/step); last loss 0.25 (step 30)"
    )
    assert done[1] == "Checkpoint: /abs/runs/x/checkpoints/30"
    assert done[2] == (
        "Train longer: python train.py --workdir=runs/x --config.total_steps=N (N > 30)"
    )
    assert "load_encoder('runs/x')" in done[3] and done[4].startswith("TensorBoard: ")
    stopped = summary.closing_lines(
        config, "runs/x", first=0, done=12, checkpoint="/c/12", stopped="SIGTERM", **common
    )
    assert stopped[0].startswith(
        "Stopped by SIGTERM after step 12; saved /c/12. Rerun the same command to resume: "
        "python train.py --workdir=runs/x --config.total_steps=30"
    )
    nothing = summary.closing_lines(
        config, "runs/x", first=30, done=30, checkpoint="/c/30", stopped=None, **common
    )
    assert nothing[0].startswith("Nothing to do: the run already reached step 30 of 30")


def test_mfu_on_a_known_gpu(tmp_path):
    assert metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert metrics.peak_flops("cpu") is None
    clock = Clock()
    writer = metrics.MetricsWriter(str(tmp_path), tiny_config(), stream=io.StringIO(), clock=clock)
    writer.flops_per_image, writer._peak = 1e12, 100e12  # what startup() sets on a GPU
    run_steps(writer, clock, 0, 10)
    writer.close()
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert row["mfu"] == pytest.approx(1e12 * 8.0 / 100e12)


def test_wandb_when_asked_for(tmp_path, monkeypatch):
    config = tiny_config()
    config.wandb.project = "ijepa"
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: say so, go on
    out = io.StringIO()
    metrics.MetricsWriter(str(tmp_path / "a"), config, stream=out).close()
    assert "wandb is not installed" in out.getvalue()

    logged = []
    run = types.SimpleNamespace(log=lambda m, step: logged.append((step, m)), finish=lambda: None)
    fake = types.SimpleNamespace(init=lambda **kw: logged.append(kw) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    clock = Clock()
    writer = metrics.MetricsWriter(str(tmp_path / "b"), config, stream=io.StringIO(), clock=clock)
    run_steps(writer, clock, 0, 10)
    writer.close()
    assert logged[0]["project"] == "ijepa" and logged[0]["name"] == "b"
    assert logged[1][0] == 10 and logged[1][1]["loss"] == pytest.approx(0.1)
