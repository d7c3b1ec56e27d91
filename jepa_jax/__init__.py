"""jepa_jax: I-JEPA pretraining in JAX/Flax with a pluggable attention seam."""

import os

# XLA reads XLA_FLAGS when the backend starts, so this must run before the first computation.
# Triton GEMM fusions lost to cuBLAS on every I-JEPA step measured on an H100 (BENCHMARKS.md:
# ViT-H/14 +5% img/s, -7% memory, -27% compile). A flag the user sets themselves wins.
_FLAG = "--xla_gpu_enable_triton_gemm"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=false".strip()
