"""Test setup: repo root on sys.path (for `configs`), 8 virtual CPU devices for sharding tests,
and one compilation cache shared by the tests and their subprocesses."""

import atexit
import os
import re
import shutil
import sys
import tempfile

# Must be set before jax initialises its backends. Appended, so a user's XLA_FLAGS keeps its own
# flags and the 8-device tests still run.
_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}".strip()
# One persistent compilation cache for the session, inherited by every train.py / bench
# subprocess: the same tiny step compiled by several tests or processes compiles once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jepa_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly (with the reason) where JAX has no GPU backend."""
    import jax

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
def one_device_env():
    """The environment for a subprocess that sees one CPU device, as a laptop does: where the mesh
    is not the point, the session's 8 virtual devices make each step 3-4x slower on 2 cores."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env["XLA_FLAGS"])
    return env
