"""Test setup: repo root on sys.path (for `configs`), 8 virtual CPU devices for sharding tests."""

import os
import sys

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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

    from jepa_jax import data, masks, sharding, trainer

    def run(config, mesh, n):
        net, state, tx = trainer.build(config, mesh)
        step_fn = trainer.compile_step(config, net, tx, mesh, state)
        spec = masks.mask_spec(config)
        batches = data.create_iterator(config)
        history = []
        for step in range(n):
            batch = trainer.local_batch(config, spec, next(batches)["images"], step)
            state, metrics = step_fn(state, sharding.global_batch(mesh, batch))
            history.append(metrics)
        batches.close()
        return state, step_fn, jax.device_get(history)

    return run
