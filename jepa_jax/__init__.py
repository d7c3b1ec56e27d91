"""jepa_jax: I-JEPA pretraining in JAX/Flax with a pluggable attention seam."""

import os

# XLA reads XLA_FLAGS when the backend starts, so this must run before the first computation.
# With Triton GEMM fusions off (cuBLAS instead), ViT-H/14 steps ran 2-5% faster and compiled
# 1.4-1.6x faster on an H100 (BENCHMARKS.md). A flag the user sets themselves wins.
_FLAG = "--xla_gpu_enable_triton_gemm"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=false".strip()
