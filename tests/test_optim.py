"""Schedules at their landmarks, the weight-decay mask, and the EMA update."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.default import get_config
from jepa_jax import optim


@pytest.fixture
def config():
    c = get_config("vit_b16")
    c.total_steps, c.optim.warmup_steps = 1000, 100
    return c


def test_learning_rate(config):
    lr = optim.learning_rate(config.optim, config.total_steps)
    assert float(lr(0)) == pytest.approx(2e-4)
    assert float(lr(50)) == pytest.approx(6e-4)
    assert float(lr(100)) == pytest.approx(1e-3)
    assert float(lr(550)) == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-5)  # cosine midpoint
    assert float(lr(1000)) == pytest.approx(1e-6, rel=1e-4)


def test_weight_decay_and_momentum(config):
    wd = optim.weight_decay(config.optim, config.total_steps)
    assert [float(wd(s)) for s in (0, 500, 1000)] == pytest.approx([0.04, 0.22, 0.4], rel=1e-5)
    m = optim.ema_momentum(config.optim, config.total_steps)
    assert [float(m(s)) for s in (0, 500, 1000)] == pytest.approx([0.996, 0.998, 1.0], rel=1e-6)


def test_decay_mask_by_name():
    params = {
        "blocks": {"fc1": {"kernel": 1, "bias": 2}, "norm1": {"scale": 3, "bias": 4}},
        "mask_token": 5,
    }
    mask = optim.decay_mask(params)
    assert mask == {
        "blocks": {
            "fc1": {"kernel": True, "bias": False},
            "norm1": {"scale": False, "bias": False},
        },
        "mask_token": True,
    }


def test_weight_decay_only_where_masked(config):
    params = {"w": {"kernel": jnp.ones(3)}, "b": {"bias": jnp.ones(3)}}
    tx = optim.optimizer(config, params)
    zero = {"w": {"kernel": jnp.zeros(3)}, "b": {"bias": jnp.zeros(3)}}
    updates, _ = tx.update(zero, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"]["kernel"], 1 - 2e-4 * 0.04, rtol=1e-6)
    np.testing.assert_array_equal(new["b"]["bias"], 1.0)


def test_ema_update():
    out = optim.ema_update({"a": jnp.array(2.0)}, {"a": jnp.array(4.0)}, jnp.array(0.75))
    assert float(out["a"]) == pytest.approx(0.75 * 2 + 0.25 * 4)
