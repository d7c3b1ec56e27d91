"""Benchmarks: each mode writes its JSON and table; FLOPs match a hand count; the batch search."""

import dataclasses
import gzip
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jepa_jax import bench, masks

ON_CPU = jax.default_backend() == "cpu"


# One encoder block and one predictor block: these tests check each mode's plumbing, and the
# tiny preset's 12 blocks only made every compile and step longer.
SHALLOW = ["--config.model.depth=1", "--config.model.pred_depth=1"]


# The pytest process has already started JAX's backend (conftest asks for it); on a GPU that
# reserves most of its memory, starving the subprocesses these modes measure in.
cpu_only = pytest.mark.skipif(not ON_CPU, reason="pytest's own process holds the GPU's memory")


def _rows(result: dict) -> dict:
    return {row["impl"]: row for row in result["rows"]}


def test_attention_mode(tmp_path, capsys):
    out = tmp_path / "attention.json"
    argv = ["attention", "--impls", "reference,xla,cudnn", "--shapes", "2x17x2x8"]
    bench.main([*argv, "--dtype", "float32", "--reps", "3", "--kv-lengths", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = _rows(result)
    for impl in ("reference", "xla"):
        row = rows[impl]
        assert row["status"] == "ok", row
        assert row["shape"] == [2, 17, 2, 8]
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["fwd_bwd_tflops"] > 0
        tolerance = 1e-5 if ON_CPU else 1e-2  # GPUs run float32 matmuls as TF32 by default
        assert row["rel_err"] < tolerance and row["grad_rel_err"] < tolerance
    assert rows["cudnn"]["status"] == "unavailable" and rows["cudnn"]["reason"]
    assert result["ratios"] == {"2x17x2x8": {}}  # cudnn did not run
    assert capsys.readouterr().out.splitlines()[-4].split()[:2] == ["impl", "shape"]


def test_attention_flops():
    assert bench.attention_flops((2, 10, 3, 8)) == 4 * 2 * 3 * 10 * 10 * 8
    assert bench.attention_flops((2, 10, 3, 8), backward=True) == 3.5 * 4 * 2 * 3 * 10 * 10 * 8


def test_flops_per_image_by_hand():
    config = bench.load_config("tiny")  # ViT-tiny: width 192, depth 12, MLP 768; 6x6 patches
    spec = dataclasses.replace(masks.mask_spec(config), num_context=10, max_target=6)
    assert (spec.grid, spec.num_targets, config.model.pred_depth) == ((6, 6), 4, 2)

    def block(t, d, f, out=None):  # 2 FLOPs per weight per token, plus Q.K^T and P.V over t x t
        out = t if out is None else out  # rows computed past attention
        return 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * out * (d * d + 2 * d * f)

    embed = 2 * 192 * (3 * 16 * 16)  # per embedded patch
    target = 36 * embed + 12 * block(36, 192, 768)
    context = 2 * 10 * embed + 3 * 12 * block(10, 192, 768)  # only the 10 kept patches
    # The predictor's last block computes only the 6 target rows it reads out.
    last = block(16, 192, 768, out=6)
    predictor = 2 * 10 * 192 * 192 + 4 * (block(16, 192, 768) + last + 2 * 6 * 192 * 192)
    assert bench.flops_per_image(config, spec) == target + context + 3 * predictor
    assert bench.flops_per_image(config, spec, target_tokens=3) < target + context + 3 * predictor


def test_load_config_overrides():
    overrides = ["--config.model.remat=True", "--config.model.attention=xla"]
    config = bench.load_config("tiny", overrides)
    assert config.model.remat is True and config.model.attention == "xla"
    assert bench.load_config("configs/default.py:vit_b16").model.variant == "base"
    with pytest.raises(ValueError, match="no_such"):
        bench.load_config("tiny", ["--config.model.no_such=1"])


@cpu_only
def test_train_mode(tmp_path, monkeypatch, xla_flags_for_devices):
    # The children inherit the environment: two devices, and the session's fast compile.
    monkeypatch.setenv("XLA_FLAGS", xla_flags_for_devices(2))
    out = tmp_path / "train.json"
    argv = [
        "train",
        "--config",
        "tiny",
        "--config.model.dtype",
        "float32",
        "--impls",
        "reference,cudnn",
        *SHALLOW,
    ]
    bench.main(
        [*argv, "--per-device-batch", "1", "--steps", "3", "--warmup", "1", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    row = _rows(result)["reference"]
    assert row["status"] == "ok", row
    assert row["global_batch"] == 2 and result["env"]["devices"] == 2
    assert row["img_per_s"] > 0 and row["flops_per_image"] > 0 and row["compile_s"] > 0
    assert row["useful_flops_per_image"] <= row["flops_per_image"]
    assert row["xla_memory"]["total_bytes"] > 0 and 0 < row["mfu"] < 1
    # Every setting that changes a row's speed is in the row, so saved files compare.
    assert (row["dtype"], row["residual_dtype"], row["fp8"], row["gelu"]) == (
        "float32",
        "float32",
        "off",
        "exact",
    )
    assert row["remat"] is False and row["fused_qkv"] is False
    cudnn = _rows(result)["cudnn"]
    assert cudnn["status"] == "unavailable" and "cudnn" in cudnn["reason"]


@cpu_only
def test_max_batch_mode(tmp_path, monkeypatch, xla_flags_for_devices):
    monkeypatch.setenv("XLA_FLAGS", xla_flags_for_devices(1))
    out = tmp_path / "max.json"
    argv = ["max-batch", "--config", "tiny", "--config.model.dtype=float32", "--impls", "xla"]
    argv += SHALLOW
    bench.main([*argv, "--start", "1", "--max-tries", "1", "--out", str(out)])
    row = _rows(json.loads(out.read_text()))["xla"]
    assert row["max_per_device_batch"] == 1 and row["global_batch"] == 1
    assert row["status"] == "ok" and not row["resolved"]  # the cap ended it, no OOM on a CPU
    assert row["img_per_s_at_max"] > 0


def _fake_spawn(limit: int, broken: int | None = None):
    """A child that runs up to `limit` per device, OOMs above it, and fails at `broken`."""

    def spawn(args, impl, per_device_batch, steps, warmup):
        status = "ok" if per_device_batch <= limit else "oom"
        if per_device_batch == broken:
            status = "error"
        row = {"impl": impl, "per_device_batch": per_device_batch, "status": status}
        if status == "ok" and steps:
            row["img_per_s"] = 10.0 * per_device_batch
        return {"env": {"devices": 4}, "row": {**row, "reason": None if status == "ok" else "x"}}

    return spawn


def test_max_batch_search_grows_then_bisects(monkeypatch):
    monkeypatch.setattr(bench.max_batch, "_spawn", _fake_spawn(limit=100))
    args = bench.parse_args(["max-batch", "--start", "16", "--max-tries", "10"])
    row, env = bench.max_batch_one(args, "xla")
    assert [t["per_device_batch"] for t in row["tries"]] == [16, 32, 64, 128, 96, 112, 104]
    assert (row["max_per_device_batch"], row["smallest_oom_per_device_batch"]) == (96, 104)
    assert row["resolved"] and row["status"] == "ok" and row["global_batch"] == 4 * 96
    assert row["img_per_s_at_max"] == 960.0  # the timed steps of the try at 96

    row, _ = bench.max_batch_one(bench.parse_args(["max-batch", "--start", "256"]), "xla")
    assert row["tries"][0]["status"] == "oom" and row["max_per_device_batch"] == 96
    assert len(row["tries"]) <= 7


def test_max_batch_search_reports_other_errors(monkeypatch):
    monkeypatch.setattr(bench.max_batch, "_spawn", _fake_spawn(limit=100, broken=32))
    row, _ = bench.max_batch_one(bench.parse_args(["max-batch", "--start", "16"]), "cudnn")
    assert row["status"] == "error" and row["max_per_device_batch"] == 16
    assert len(row["tries"]) == 2


def test_breakdown_mode(tmp_path):
    out = tmp_path / "breakdown.json"
    argv = ["breakdown", "--config", "tiny", "--impls", "reference", "--per-device-batch", "1"]
    bench.main([*argv, *SHALLOW, "--reps", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["part"] for r in rows] == [
        "target encoder fwd",
        "context encoder fwd+bwd",
        "predictor fwd+bwd",
        "adamw + ema",
        "whole step",
    ]
    assert all(r["ms"] > 0 for r in rows)
    config = bench.load_config("tiny", SHALLOW)
    spec = masks.mask_spec(config)
    parts = bench.step_flops_by_part(config, spec)
    assert sum(parts.values()) == pytest.approx(bench.flops_per_image(config, spec))


def _trace_event(name, pid, tid, dur, ts=0):
    return {"ph": "X", "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur}


# Trace metadata naming process 1 a GPU and its thread 7 a kernel stream.
GPU_STREAM = [
    {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #13"}},
]


def test_profile_groups_gpu_stream_kernels_by_kind():
    meta = GPU_STREAM + [
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #13"}},
    ]
    kernels = [
        _trace_event("loop_convert_fusion_3", 1, 7, 300.0),
        _trace_event("loop_convert_fusion_17", 1, 7, 100.0),
        _trace_event("nvjet_sm90_tst_256x128_bias_NNT", 1, 7, 1000.0),
        _trace_event("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 1, 7, 500.0),
        _trace_event("memcpy32_post", 1, 7, 100.0),
        _trace_event("fusion.3", 1, 8, 9999.0),  # the op-level line, not a kernel
        _trace_event("loop_add_fusion", 2, 7, 9999.0),  # a host thread of the same name
    ]
    found = bench.device_kernels({"traceEvents": meta + kernels})
    assert len(found) == 5
    table = bench.kernel_table(found, steps=2)
    assert [(r["group"], r["kind"]) for r in table] == [
        ("nvjet_sm#_tst_#x#_bias_NNT", "gemm"),
        ("cudnn_generated_fort_native_sdpa_sm#_flash_fprop", "attention"),
        ("loop_convert_fusion_#", "fusion"),
        ("memcpy#_post", "copy"),
    ]
    assert bench.kernel_table([("short_attention_backward__1", 1.0)], 1)[0]["kind"] == "attention"
    assert bench.kernel_table([("anonymous_mosaic_gpu_kernel", 1.0)], 1)[0]["kind"] == "gemm"
    convert = table[2]
    assert convert["ms_per_step"] == pytest.approx(0.2) and convert["kernels_per_step"] == 1
    assert sum(r["share"] for r in table) == pytest.approx(1.0)


def test_profile_counts_the_time_no_gpu_stream_runs_a_kernel():
    """Overlapping kernels on two streams count once; the gaps between them, and only those
    on GPU streams, are idle."""
    second = {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "Stream #2"}}
    host = {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}
    gap = float(np.random.default_rng().integers(1, 50))
    kernels = [
        _trace_event("a", 1, 7, 10.0, ts=100.0),
        _trace_event("b", 1, 9, 10.0, ts=105.0),  # the other stream, overlapping a
        _trace_event("c", 1, 7, 2.0, ts=108.0),  # inside a and b
        _trace_event("d_3", 1, 7, 5.0, ts=115.0 + gap),
        _trace_event("host work", 2, 7, 1000.0, ts=0.0),
    ]
    trace = {"traceEvents": GPU_STREAM + [second, host] + kernels}
    assert bench.idle_per_step(trace, steps=1)[0] == pytest.approx(gap / 1e3)
    assert bench.idle_per_step({"traceEvents": GPU_STREAM}, steps=1) == (0.0, {})
    kernels.append(_trace_event("d_17", 1, 9, 1.0, ts=130.0 + 2 * gap))  # d's group waited again
    kernels.append(_trace_event("e", 1, 7, 1.0, ts=140.0 + 2 * gap))
    _, waits = bench.idle_per_step({"traceEvents": GPU_STREAM + [second, host] + kernels}, 2)
    assert waits == pytest.approx({"d_#": (2 * gap + 10) / 2e3, "e": 9 / 2e3})


def test_profile_gives_fusion_groups_the_bytes_their_kernels_move():
    """A fusion's kernel moves its operands and results once each (the HLO's shapes); launches
    of one kernel name each count those bytes; GB/s is bytes over those kernels' time."""
    rows, cols = np.random.default_rng().integers(8, 64, 2)
    x = jnp.ones((rows, cols), jnp.float32)
    y = jnp.ones((rows, cols), jnp.bfloat16)
    step = jax.jit(lambda x, y: (jnp.sin(x) * y).astype(jnp.bfloat16))
    found = bench.fusion_bytes(step.lower(x, y).compile().as_text())
    ((name, moved),) = found.items()  # the one elementwise fusion: read f32 and bf16, write bf16
    assert moved == rows * cols * (4 + 2 + 2) and "." not in name
    kernels = [_trace_event(name, 1, 7, 2.0), _trace_event(name, 1, 7, 2.0)]
    kernels.append(_trace_event("nvjet_sm90_tst", 1, 7, 10.0))
    found_kernels = bench.device_kernels({"traceEvents": GPU_STREAM + kernels})
    table = bench.kernel_table(found_kernels, 1, found)
    gemm, fusion = table
    assert gemm["gb_per_s"] is None and gemm["bytes_per_step"] is None
    assert fusion["bytes_per_step"] == 2 * moved
    assert fusion["gb_per_s"] == pytest.approx(2 * moved / 4e-6 / 1e9)


def test_profile_by_kernel_says_what_each_fusion_computes():
    """`--by kernel`: each kernel name is its own row, with its fusion's ops (not the plumbing
    of parameters and broadcasts) and result shape; a group of several names says nothing."""
    rows, cols = np.random.default_rng().integers(8, 64, 2)
    x = jnp.ones((rows, cols), jnp.float32)
    step = jax.jit(lambda x: (jnp.sin(x) * 2 * x).astype(jnp.bfloat16))
    ((name, what),) = bench.fusion_contents(step.lower(x).compile().as_text()).items()
    assert what.startswith("multiply x2") and "sine" in what and "parameter" not in what
    assert what.endswith(f"-> bf16[{rows},{cols}]")
    kernels = [(name, 3.0), (f"{name}_17", 1.0), (name, 3.0)]
    alone = bench.kernel_table(kernels, 1, contents={name: what}, group_of=bench.kernel_alone)
    assert [(r["group"], r["what"], r["kernels_per_step"]) for r in alone] == [
        (name, what, 2),
        (f"{name}_17", None, 1),
    ]
    (grouped,) = bench.kernel_table([(f"{name}_3", 3.0), (f"{name}_17", 1.0)], 1, contents={})
    assert grouped["what"] is None


def test_profile_mode_writes_trace_and_json(tmp_path):
    out, traces = tmp_path / "profile.json", tmp_path / "traces"
    argv = ["profile", "--config", "tiny", "--impls", "reference", "--per-device-batch", "1"]
    argv += ["--by", "kernel"]  # each kernel alone (the grouping is tested above)
    bench.main(
        [*argv, *SHALLOW, "--steps", "1", "--warmup", "0", "--trace-dir", str(traces)]
        + ["--out", str(out)]
    )
    result = json.loads(out.read_text())
    (summary,) = result["summaries"]
    assert summary["traced_wall_ms_per_step"] > 0
    (trace,) = traces.glob("reference/**/perfetto_trace.json.gz")
    if ON_CPU:  # no GPU stream: no kernel rows, but the trace holds the step and XLA's CPU ops
        assert result["rows"] == [] and summary["kernel_ms_per_step"] == 0
        events = json.load(gzip.open(trace))
        events = events["traceEvents"] if isinstance(events, dict) else events
        names = {e.get("name") or "" for e in events if e.get("ph") == "X"}
        assert "PjitFunction(jit(train_step))" in names  # the step, compiled ahead of time
        assert any("fusion" in name for name in names)
    else:
        assert summary["kernel_ms_per_step"] > 0 and result["rows"]
        # fusion kernels are named after their fusions, so the HLO's bytes reach their groups
        rates = [r["gb_per_s"] for r in result["rows"] if r["kind"] == "fusion"]
        assert any(rate and np.isfinite(rate) and rate > 0 for rate in rates), result["rows"]


def test_hlo_counts_the_slices_a_fusion_reads_and_the_update_it_writes():
    """A fusion that takes one layer out of stacked weights reads that layer only; one that
    updates a slice of a buffer in place writes only the update."""
    layers, rows, cols = np.random.default_rng().integers(3, 40, 3)
    stacked = jnp.ones((layers, rows, cols), jnp.float32)
    x = jnp.ones((rows, cols), jnp.bfloat16)
    pick = jax.jit(lambda w, i, x: jnp.sin(jax.lax.dynamic_index_in_dim(w, i, 0, False)) * x)
    text = pick.lower(stacked, 1, x).compile().as_text()
    (moved,) = bench.hlo.fusion_bytes(text).values()
    assert moved == rows * cols * (4 + 2 + 4) + 4  # the layer, x, the result, the index
    # Elementwise ops compute only the elements a slice asks of them: one layer is read.
    norms = jax.jit(lambda w: jnp.sqrt(jnp.sum((w * w)[1], axis=0)))
    moved = bench.hlo.fusion_bytes(norms.lower(stacked).compile().as_text()).values()
    # One fusion, or (some shapes, some XLAs) the squared layer written out and reduced apart.
    layer = rows * cols * 4
    assert layer + cols * 4 <= max(moved) <= 2 * layer < layers * layer
    update = jax.jit(
        lambda w, i, u: jax.lax.dynamic_update_index_in_dim(w, jnp.sin(u), i, 0), donate_argnums=0
    )
    text = update.lower(stacked, 1, x.astype(jnp.float32)).compile().as_text()
    ((kernel),) = bench.hlo.kernels(text)
    assert kernel["kind"] == "fusion" and kernel["group"].endswith("_fusion_#")
    assert kernel["bytes"] == rows * cols * (4 + 4) + 4  # the update read and written, the index


# Lines of a step compiled for an H100, cut to what the parser reads.
GPU_HLO = (pathlib.Path(__file__).parent / "data" / "h100_step_excerpt.hlo").read_text()


def test_hlo_names_the_gemms_attention_and_pallas_kernels_a_gpu_step_launches():
    found = bench.hlo.kernels(GPU_HLO)
    groups = [(k["kind"], k["group"]) for k in found]
    assert (
        groups
        == [
            ("gemm", "cuBLAS bf16 GEMM, DEFAULT epilogue, writes bf16"),
            ("gemm", "cuBLAS fp8 GEMM, BIAS_GELU epilogue, writes f8e4m3fn"),
            ("attention", "cuDNN fmhaSoftmax"),
            ("fusion", "Pallas gelu"),
            ("gemm", "Pallas q/k/v projection (Mosaic GPU)"),
        ]
        + [("fusion", "loop_add_fusion_#")] * 3
    )  # the while loop's body, once per trip
    # The GEMM on one layer of the stacked weights reads that layer: 64 x 128, not 4 x that.
    assert found[0]["bytes"] == (64 * 128 + 32 * 64 + 32 * 128) * 2
    assert found[1]["bytes"] == (32 * 512 + 512 * 128) * 2 + 32 * 128 + 4
    assert found[-1]["bytes"] == 32 * 128 * (4 + 2 + 4)
    assert found[-1]["what"] == "convert, add -> f32[32,128]"  # ties: first seen first
    rows = bench.compiled.group_rows(found, bandwidth=1e12)
    assert rows[0]["group"] == "cuBLAS fp8 GEMM, BIAS_GELU epilogue, writes f8e4m3fn"
    (loop,) = [r for r in rows if r["group"] == "loop_add_fusion_#"]
    assert loop["kernels"] == 3 and loop["gb"] == 3 * 32 * 128 * 10 / 1e9
    assert loop["least_ms"] == pytest.approx(loop["gb"])  # 1 GB at 1 TB/s: 1 ms


# Collectives as a GPU step's HLO writes them (lines cut): an async all-gather over a named
# mesh axis, a reduce-scatter in iota groups, an async all-reduce in listed groups.
COLLECTIVES_HLO = """
ENTRY %main (p: bf16[16,192], g: f32[1024]) -> f32[1024] {
  %p = bf16[16,192]{1,0} parameter(0)
  %g = f32[1024]{0} parameter(1)
  %ag-start = (bf16[16,192]{1,0}, bf16[64,192]{1,0}) all-gather-start(%p), channel_id=1, \
replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}, dimensions={0}
  %ag-done = bf16[64,192]{1,0} all-gather-done(%ag-start)
  %rs = f32[256]{0} reduce-scatter(%g), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %ar-start = ((f32[1024]{0}), f32[1024]{0}) all-reduce-start(%g), channel_id=3, \
replica_groups={{0,1},{2,3},{4,5},{6,7}}
  ROOT %ar-done = f32[1024]{0} all-reduce-done(%ar-start)
}
"""


def test_hlo_counts_what_each_device_sends_for_a_collective():
    found = bench.hlo.kernels(COLLECTIVES_HLO)
    assert [(k["kind"], k["group"]) for k in found] == [
        ("collective", "all-gather"),
        ("collective", "reduce-scatter"),
        ("collective", "all-reduce"),
    ]
    # Ring algorithms: a device sends (n - 1) / n of the whole tensor, twice for an all-reduce.
    assert [k["bytes"] for k in found] == [64 * 192 * 2 * 3 // 4, 1024 * 4 * 3 // 4, 1024 * 4]
    assert [k["what"] for k in found] == ["bf16", "f32", "f32"]  # the element types carried
    rows = bench.compiled.group_rows(found, bandwidth=1e12, link_bandwidth=1e9)
    (gather,) = [r for r in rows if r["group"] == "all-gather"]
    assert gather["least_ms"] == pytest.approx(gather["gb"] * 1e3)  # at the link's 1 GB/s
    mixed = bench.compiled.group_rows([*found, {**found[2], "what": "s32"}], bandwidth=1e12)
    assert [r["what"] for r in mixed if r["group"] == "all-reduce"] == ["f32, s32"]


def _cuda_plugin() -> bool:
    from importlib.util import find_spec

    return bool(find_spec("jax_plugins")) and any(
        find_spec(f"jax_plugins.xla_cuda{version}") for version in (12, 13)
    )


@pytest.mark.skipif(not _cuda_plugin(), reason="needs jax's CUDA plugin (jax[cuda13]), no GPU")
def test_compiled_mode_compiles_the_step_for_a_gpu_it_need_not_have(tmp_path):
    """`compiled` builds the real step for an H100 from abstract arrays: with the tanh GELU it
    runs cuDNN attention and the GELU in cuBLAS epilogues; afterwards jax sees its own devices."""
    devices = jax.devices()
    out = tmp_path / "compiled.json"
    argv = ["compiled", "--config", "tiny", "--impls", "auto", "--per-device-batch", "4"]
    argv += ["--gpu", "h100", "--config.model.gelu=tanh", "--top", "100", "--out", str(out)]
    result = bench.main([*argv, "--hlo-dir", str(tmp_path / "hlo")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    text = (tmp_path / "hlo" / "auto.hlo").read_text()
    assert len(bench.hlo.kernels(text)) == sum(row["kernels"] for row in result["rows"])
    assert " tanh(" not in text  # every GELU inside a GEMM, as the GPU test finds on a GPU
    groups = {row["group"] for row in result["rows"]}
    assert {"cuDNN fmhaSoftmax", "cuBLAS bf16 GEMM, BIAS_GELU epilogue, writes bf16"} <= groups
    (summary,) = result["summaries"]
    assert summary["by_kind"]["fusion"]["least_ms"] > 0 and summary["temp_bytes"] > 0
    assert jax.devices() == devices


@pytest.mark.skipif(not _cuda_plugin(), reason="needs jax's CUDA plugin (the [cuda] extra)")
def test_compiled_mode_compiles_an_fsdp_step_for_several_gpus(tmp_path):
    """4 H100s on an FSDP mesh with cuDNN attention (its partitioner once stopped this compile:
    q, k and v were sharded apart): parameters gathered, gradients reduce-scattered, and the
    Pallas kernels run on each GPU's rows (they once ran on one device only)."""
    argv = ["compiled", "--config", "tiny", "--gpus", "4", "--per-device-batch", "4"]
    argv += ["--gpu", "h100", "--config.mesh.fsdp=4", "--config.mesh.data=1"]
    argv += ["--top", "100", "--out", str(tmp_path / "out.json")]
    result = bench.main(argv)
    groups = {row["group"] for row in result["rows"]}
    assert {"cuDNN fmhaSoftmax", "all-gather", "reduce-scatter"} <= groups
    assert {"Pallas short_attention_backward", "Pallas gelu"} <= groups
    assert "all-to-all" not in groups
    (summary,) = result["summaries"]
    assert summary["devices"] == 4 and summary["by_kind"]["collective"]["gb"] > 0
    # The bf16 step's gradients are summed over the GPUs in float32 (XLA once summed in bf16).
    sums = [
        row["what"] for row in result["rows"] if row["group"] in ("all-reduce", "reduce-scatter")
    ]
    assert sums and not any("bf16" in what for what in sums)


@pytest.mark.skipif(_cuda_plugin(), reason="jax's CUDA plugin is installed here")
def test_compiled_mode_without_the_cuda_plugin_says_how_to_install_it():
    import subprocess
    import sys

    argv = [sys.executable, "-m", "jepa_jax.bench", "compiled", "--config", "tiny"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and 'pip install -e ".[cuda]"' in done.stderr


def _write_metrics(workdir: pathlib.Path, losses: dict[int, float], tail: str = "") -> None:
    workdir.mkdir()
    rows = [json.dumps({"step": s, "loss": v, "lr": 1e-3}) for s, v in losses.items()]
    (workdir / "metrics.jsonl").write_text("\n".join(rows) + "\n" + tail)


def test_curves_mode_compares_runs_by_window(tmp_path, capsys):
    """Window means against the first run, steps above it after the burn-in, the largest gap;
    a resumed run's re-logged step counts once (its later row), a half-written last line not."""
    rng = np.random.default_rng()
    steps = range(10, 810, 10)
    base = {s: float(rng.uniform(0.1, 0.2)) / s for s in steps}
    other = {s: v * 1.1 for s, v in base.items()}  # 10% above the baseline everywhere
    other_run = {**other, 400: 5.0}  # a row the resumed run rewrote below
    _write_metrics(tmp_path / "a", base)
    _write_metrics(tmp_path / "b", other_run, tail=json.dumps({"step": 400, "loss": other[400]}))
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('\n{"step": 810, "lo')  # killed mid-line
    out = tmp_path / "curves.json"
    bench.main(["curves", f"base={tmp_path / 'a'}", str(tmp_path / "b"), "--out", str(out)])
    result = json.loads(out.read_text())
    windows = [r["window"] for r in result["rows"] if r["impl"] == "base"]
    assert windows == ["1-100", "101-200", "201-400", "401-600", "601-800"]
    for row in result["rows"]:
        lo, hi = map(int, row["window"].split("-"))
        mean = np.mean([v for s, v in base.items() if lo <= s <= hi])
        expected = mean if row["impl"] == "base" else 1.1 * mean
        np.testing.assert_allclose(row["mean_loss"], expected, rtol=1e-6)
        np.testing.assert_allclose(row["minus_first"], expected - mean, rtol=1e-5, atol=1e-12)
    summary = result["ratios"][str(tmp_path / "b")]
    assert summary["above_first"] == "60 of 60"  # steps after 200 (a quarter of 800)
    largest = max(0.1 * v for s, v in base.items() if s > 200)
    np.testing.assert_allclose(summary["largest_gap"], largest, rtol=1e-5)
    np.testing.assert_allclose(summary["last_loss"], other[800], rtol=1e-6)
    printed = capsys.readouterr().out
    assert "step 210 to 800" in printed and "'.' base" in printed


def test_curves_mode_compares_only_the_steps_every_run_logged(tmp_path, capsys):
    """Runs logged at other intervals, cut short by a non-finite loss, or named by a path that
    holds '=': means over the shared steps only, and the divergence reported, not hidden."""
    base = {s: 1.0 / s for s in range(10, 1010, 10)}
    dense = {s: 1.2 / s for s in range(5, 1010, 5)}  # its own steps' means would be higher
    diverged = {s: (1.1 / s if s < 600 else float("nan")) for s in base}
    _write_metrics(tmp_path / "a", base)
    _write_metrics(tmp_path / "lr=2", dense)
    _write_metrics(tmp_path / "c", diverged)
    out = tmp_path / "curves.json"
    runs = [str(tmp_path / "a"), str(tmp_path / "lr=2"), f"c={tmp_path / 'c'}"]
    bench.main(["curves", *runs, "--out", str(out)])
    result = json.loads(out.read_text())
    for row in result["rows"]:
        if row["impl"].endswith("lr=2"):  # 1.2x the baseline at every shared step
            np.testing.assert_allclose(row["over_first"], 1.2, rtol=1e-9)
    summary = result["ratios"]["c"]
    assert summary["not_finite_from"] == 600 and summary["above_first"] == "34 of 34"
    printed = capsys.readouterr().out
    assert "c: loss not finite at 41 logged steps from step 600 on" in printed
    assert "steps 10 to 1000, the 100 every run logged" in printed


def test_curves_mode_says_what_is_missing(tmp_path):
    _write_metrics(tmp_path / "a", {10: 0.5, 20: 0.4})
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        bench.main(["curves", str(tmp_path / "a"), str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="at least two runs"):
        bench.main(["curves", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="FIRST-LAST"):
        bench.main(["curves", f"x={tmp_path / 'a'}", f"y={tmp_path / 'a'}", "--windows", "1:5"])
    with pytest.raises(ValueError, match="two runs named"):
        bench.main(["curves", str(tmp_path / "a"), str(tmp_path / "a")])
    pair = [f"x={tmp_path / 'a'}", f"y={tmp_path / 'a'}"]
    with pytest.raises(ValueError, match="holds none of the steps"):
        bench.main(["curves", *pair, "--windows", "1-5"])
    with pytest.raises(ValueError, match="choose a step before it"):
        bench.main(["curves", *pair, "--after", "20"])
    _write_metrics(tmp_path / "zero", {10: 0.0, 20: 0.0})
    bench.main(
        [
            "curves",
            f"z={tmp_path / 'zero'}",
            f"a={tmp_path / 'a'}",
            "--out",
            str(tmp_path / "z.json"),
        ]
    )
    assert all(
        math.isnan(r["over_first"])
        for r in json.loads((tmp_path / "z.json").read_text())["rows"]
        if r["impl"] == "a"
    )
