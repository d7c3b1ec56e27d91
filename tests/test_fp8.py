"""FP8 in the target encoder (models.fp8): e4m3 rounding with per-tensor scales, FP8 only where
asked, FP8 GEMMs on the GPU, a training step with it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from jepa_jax import configuration, models, objective, sharding, trainer
from jepa_jax.models import fp8
from tests.numerics import fresh_key, rel_err


def test_quantize_dequantize_rounds_to_e4m3_at_per_tensor_scale():
    x = jax.random.normal(fresh_key(), (256, 192), jnp.float32) * 3.0
    got = fp8.quantize_dequantize(x)
    # The largest magnitude maps to e4m3's largest value, so it comes back exactly.
    assert float(jnp.max(jnp.abs(got))) == pytest.approx(float(jnp.max(jnp.abs(x))), rel=1e-6)
    # 3 mantissa bits: relative rounding error at most 2^-4 where values are normal e4m3.
    big = jnp.abs(x) > float(jnp.max(jnp.abs(x))) / 2**5
    assert float(jnp.max(jnp.abs(got - x)[big] / jnp.abs(x)[big])) <= 2**-4 + 1e-6
    assert 5e-3 < rel_err(got, x) < 5e-2
    zeros = fp8.quantize_dequantize(jnp.zeros((4, 4), jnp.bfloat16))
    assert zeros.dtype == jnp.bfloat16 and not jnp.any(zeros)


def test_fp8_dot_general_against_float32():
    """Error well above bf16's (FP8 really runs) and within e4m3's."""
    kx, kw = jax.random.split(fresh_key())
    x = jax.random.normal(kx, (64, 256), jnp.float32)
    w = jax.random.normal(kw, (256, 128), jnp.float32) * 0.02
    want = jnp.dot(x, w, precision="highest")
    dims = (((1,), (0,)), ((), ()))
    got = fp8.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dims)
    bf16 = jax.lax.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dims)
    assert got.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(got)))
    assert 3 * rel_err(bf16, want) < rel_err(got, want) < 6e-2


def test_with_fp8_matmuls_copies_only_the_blocks():
    encoder = models.create("vit_t16", attention="xla", image_size=64, seed=0).encoder
    copy = models.with_fp8_matmuls(encoder)
    linears = [m for _, m in nnx.iter_graph(copy.blocks) if isinstance(m, nnx.Linear)]
    assert len(linears) == 4 and all(m.dot_general is fp8.dot_general for m in linears)
    untouched = (copy.patch_embed, encoder.blocks.layers.fc1, encoder.blocks.layers.attn.qkv)
    assert all(m.dot_general is not fp8.dot_general for m in untouched)
    for a, b in zip(
        jax.tree.leaves(nnx.state(encoder)), jax.tree.leaves(nnx.state(copy)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    images = jax.random.normal(fresh_key(), (2, 64, 64, 3), jnp.float32)
    err = rel_err(copy(images), encoder(images))
    assert 1e-4 < err < 0.1, err


def test_bad_fp8_setting_is_refused():
    config = get_config("tiny")
    config.model.fp8 = "all"
    with pytest.raises(ValueError, match=r"config.model.fp8='all' is invalid: choose one of"):
        configuration.validate(config)


def test_training_step_with_fp8_targets(run_steps):
    """The target encoder alone runs FP8; its features stay near the bf16 encoder's; steps run."""
    config = get_config("tiny")
    config.model.depth, config.model.fp8 = 2, "target"
    configuration.validate(config)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    net, state, _ = trainer.build(config, mesh)
    assert net.target_encoder != net.encoder
    side = config.model.image_size
    images = jax.random.normal(fresh_key(), (2, side, side, 3), jnp.float32)
    idx = jnp.arange(8).reshape(1, 1, 8).repeat(2, 0)
    plain = dataclasses.replace(net, target_encoder=net.encoder)
    got = objective.target_features(net, state.target, images, idx)
    want = objective.target_features(plain, state.target, images, idx)
    assert 1e-3 < rel_err(got, want) < 0.2
    _, _, metrics = run_steps(config, mesh, 2)
    assert all(np.isfinite(float(m["loss"])) for m in metrics)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles for a CUDA GPU")
def test_fp8_matmuls_compile_to_fp8_gemms():
    """XLA's rewriter turns the q-dq pattern into cuBLASLt FP8 GEMMs (Hopper and later)."""
    x = jnp.ones((256, 512), jnp.bfloat16)
    w = jnp.ones((512, 256), jnp.bfloat16)
    hlo = (
        jax.jit(lambda x, w: fp8.dot_general(x, w, (((1,), (0,)), ((), ()))))
        .lower(x, w)
        .compile()
        .as_text()
    )
    assert "f8e4m3fn" in hlo and "cublas$lt$matmul$f8" in hlo, hlo[:2000]
