"""Benchmarks: attention kernels, I-JEPA steps (img/s, MFU, memory), largest batch, profiles,
the compiled step's kernels, runs' loss curves compared.

Usage (from the repo root; each run writes one JSON file and prints a table last on stdout):
  python -m jepa_jax.bench attention [--impls reference,xla,cudnn]
      [--shapes 256x196x12x64,128x69x16x80] [--dtype bfloat16] [--kv-lengths]
      [--reps 20] [--warmup 3] [--out bench_attention.json] [--plot attention.png]
  python -m jepa_jax.bench train [--config vit_b16] [--config.model.remat=True ...]
      [--impls cudnn,xla,reference] [--per-device-batch 128] [--steps 20] [--warmup 3]
      [--peak-tflops 989] [--out bench_train.json]
  python -m jepa_jax.bench max-batch [--config vit_h14] [--config.FIELD=VALUE ...]
      [--impls cudnn,xla]
      [--start 128] [--max-tries 7] [--multiple 8] [--steps 3] [--out bench_max-batch.json]
  python -m jepa_jax.bench breakdown [--config vit_h14] [--impls cudnn] [--per-device-batch 128]
      [--reps 10] [--out bench_breakdown.json]   (each part of the step timed alone, in-process)
  python -m jepa_jax.bench profile [--config vit_h14] [--impls cudnn] [--per-device-batch 128]
      [--steps 3] [--warmup 3] [--top 25] [--trace-dir bench_trace] [--by group|kernel]
      [--out bench_profile.json]
      (a jax.profiler trace of the step; its GPU kernels grouped by name, in ms per step,
      and each fusion group's achieved GB/s from the bytes its HLO moves; --by kernel lists
      each kernel alone with what its fusion computes)
  python -m jepa_jax.bench compiled [--config vit_h14] [--impls cudnn] [--per-device-batch 128]
      [--gpu h100|h200] [--top 30] [--hlo-dir DIR] [--out bench_compiled.json]
      (the step compiled for that GPU without one, by jax's CUDA plugin: its kernels grouped,
      cuBLAS GEMMs by precision, epilogue and output type, with the bytes each group moves and
      the least time they take at the card's bandwidth)

  python -m jepa_jax.bench curves NAME=WORKDIR NAME=WORKDIR ... [--windows 1-250,251-500]
      [--after STEP] [--out bench_curves.json]
      (runs' loss curves from their metrics.jsonl, the first the baseline: mean loss per window
      of steps, each run's gap to the first, how often it sits above it after --after, and an
      ASCII plot of the first two)

Every mode but `compiled` takes --plot PATH: the implementations (for `curves`, the runs) side by
side as bar charts (needs matplotlib, the `plot` extra).

`train` and `max-batch` run every measurement in a fresh subprocess: a process's peak device
memory never resets, and an out-of-memory error must not poison the measurements after it. Their
parent never starts a JAX backend; call them from a process that has not either (on a GPU a
started backend reserves most of the memory the subprocesses need).
"""

from jepa_jax.bench.attention import attention_flops, bench_attention_one
from jepa_jax.bench.breakdown import breakdown_rows
from jepa_jax.bench.cli import MODES, main, parse_args
from jepa_jax.bench.common import format_table, load_config
from jepa_jax.bench.hlo import fusion_bytes, fusion_contents
from jepa_jax.bench.max_batch import max_batch_one
from jepa_jax.bench.profile import (
    device_kernels,
    idle_per_step,
    kernel_alone,
    kernel_table,
)
from jepa_jax.bench.train import train_row
from jepa_jax.flops import flops_per_image, step_flops_by_part

__all__ = [
    "MODES",
    "attention_flops",
    "bench_attention_one",
    "breakdown_rows",
    "device_kernels",
    "flops_per_image",
    "format_table",
    "fusion_bytes",
    "fusion_contents",
    "idle_per_step",
    "kernel_alone",
    "kernel_table",
    "load_config",
    "main",
    "max_batch_one",
    "parse_args",
    "step_flops_by_part",
    "train_row",
]
