"""Test setup: repo root on sys.path (for `configs`), 8 virtual CPU devices for sharding tests,
and one compilation cache shared by the tests and their subprocesses."""

import atexit
import os
import re
import shutil
import sys
import tempfile
from importlib import metadata

# Must be set before jax initialises its backends. Appended, so a user's XLA_FLAGS keeps its own
# flags and the 8-device tests still run.
_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
_DEVICES_PATTERN = r"--xla_force_host_platform_device_count=\d+"
# On a CPU, this process compiles hundreds of small programs and runs a few steps of each: LLVM's
# optimisation costs more than it saves (suite on 2 cores: CPU time 12.0 -> 10.2 min, wall 5:46 ->
# 5:24), and so do XLA's newer fusion emitters (compile-bound files alone: CPU time 244 -> 152 s;
# steps run up to 1.4x slower). Subprocess tests that run many steps take both off again
# (one_device_env). Not where a GPU may be present.
_FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
_FAST_EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"
_ON_CPU = not os.path.exists("/dev/nvidiactl")
# jaxlib 0.11 (Python 3.12 and later) has only the fusion emitters; its XLA stops the process at
# the flag ("Unknown flag in XLA_FLAGS").
_HAS_EMITTER_FLAG = tuple(map(int, metadata.version("jaxlib").split(".")[:2])) < (0, 11)


def _append_flag(name: str, flag: str) -> None:
    if name not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


_append_flag("xla_force_host_platform_device_count", _DEVICES_FLAG)
if _ON_CPU:
    _append_flag("xla_backend_optimization_level", _FAST_COMPILE_FLAG)
    if _HAS_EMITTER_FLAG:
        _append_flag("xla_cpu_use_fusion_emitters", _FAST_EMITTER_FLAG)
# One persistent compilation cache for the session, inherited by every train.py / bench
# subprocess: the same tiny step compiled by several tests or processes compiles once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jepa_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

# The files that take longest on 2 CPU cores, longest first (`--durations=0`). They are
# collected first, and pyproject's `--no-loadscope-reorder` keeps that order, so the two xdist
# workers start on them and the run ends on short files, not with one core idle.
SLOWEST_FILES = (
    "test_faults.py",
    "test_readme.py",
    "test_bench.py",
    "test_evaluate.py",
    "test_models.py",
    "test_multiprocess.py",
    "test_sharding.py",
    "test_convert.py",
    "test_checkpoint.py",
    "test_trainer.py",
    "test_data.py",
    "test_errors.py",
)


def pytest_collection_modifyitems(config, items):
    """Slowest files first; GPU tests skip cleanly (with the reason) where JAX has no GPU."""
    import jax

    def rank(item):
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)  # stable: each file's tests keep their order

    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU; JAX backend is {jax.default_backend()}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def run_steps():
    """Train `n` steps with the trainer's own pieces; returns (state, step_fn, per-step metrics)."""
    import jax

    from jepa_jax import data, sharding, trainer

    def run(config, mesh, n):
        net, state, tx = trainer.build(config, mesh)
        step_fn = trainer.compile_step(config, net, tx, mesh, state)
        batches = data.create_iterator(config)
        history = []
        for _ in range(n):
            state, metrics = step_fn(state, sharding.global_batch(mesh, next(batches)))
            history.append(metrics)
        batches.close()
        return state, step_fn, jax.device_get(history)

    return run


@pytest.fixture(scope="session")
def xla_flags_for_devices():
    """XLA_FLAGS for a subprocess that sees `n` virtual CPU devices and otherwise compiles as this
    session does (on a CPU, the fast-compile flags above: its results are not the point)."""
    return lambda n: re.sub(
        _DEVICES_PATTERN, f"--xla_force_host_platform_device_count={n}", os.environ["XLA_FLAGS"]
    )


@pytest.fixture(scope="session")
def one_device_env():
    """The environment for a subprocess that sees one CPU device, as a laptop does: where the mesh
    is not the point, the session's 8 virtual devices make each step 3-4x slower on 2 cores."""
    flags = re.sub(_DEVICES_PATTERN, "", os.environ["XLA_FLAGS"])
    if _ON_CPU:  # these run tens of steps: optimised code pays for its compile there
        flags = flags.replace(_FAST_COMPILE_FLAG, "").replace(_FAST_EMITTER_FLAG, "")
    return dict(os.environ, XLA_FLAGS=flags.strip())
