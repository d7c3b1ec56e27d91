"""FP8 in the target encoder (models.fp8): e4m3 rounding with per-tensor scales, FP8 only where
asked, FP8 GEMMs on the GPU, a training step with it."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from jepa_jax import attention, configuration, models, objective, sharding, trainer
from jepa_jax.models import fp8, vit
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


def test_a_bound_above_the_maximum_keeps_e4m3_precision_and_one_below_saturates():
    x = jax.random.normal(fresh_key(), (256, 192), jnp.float32)
    amax = jnp.max(jnp.abs(x))
    own = rel_err(fp8.quantize_dequantize(x), x)
    # 4 binades of headroom: only values near e4m3's smallest normals lose bits.
    assert rel_err(fp8.quantize_dequantize(x, 16 * amax), x) < 1.2 * own
    short = fp8.quantize_dequantize(x, amax / 2)  # a bound too low: clipped, never NaN
    assert float(jnp.max(jnp.abs(short))) == pytest.approx(float(amax) / 2, rel=1e-6)
    # A bound past what float16 can scale (448 x scale would overflow): finite, not NaN.
    huge = fp8.quantize_dequantize(x.astype(jnp.float16), jnp.float32(1e30))
    assert bool(jnp.all(jnp.isfinite(huge)))
    # Gradients pass the rounding straight through, even small ones, and none reaches the bound
    # (nor the parameters it came from): the scale is not trained.
    cotangent = 1e-6 * jax.random.normal(fresh_key(), x.shape)
    loss = lambda x, b: jnp.sum(fp8.quantize_dequantize(x, b) * cotangent)  # noqa: E731
    dx, dbound = jax.grad(loss, argnums=(0, 1))(x, 4 * amax)
    np.testing.assert_array_equal(dx, cotangent)
    assert float(dbound) == 0.0


def test_the_scale_is_the_one_bf16_holds():
    """The scale that divides is the one that multiplies back, even where bf16 cannot hold the
    exact scale: bound / 448 = 1 + 2^-8 lies halfway between the bf16 values 1 and 1 + 2^-7, so
    the scale is 1 and the result is e4m3's own rounding (dividing by the exact scale and
    multiplying by bf16's would scale every value by 1 - 0.4% before rounding)."""
    x = jnp.clip(100 * jax.random.normal(fresh_key(), (256, 256)), -440, 440).astype(jnp.bfloat16)
    got = fp8.quantize_dequantize(x, jnp.float32(fp8.E4M3_MAX * (1 + 2**-8)))
    np.testing.assert_array_equal(got, x.astype(fp8.E4M3).astype(jnp.bfloat16))


def test_the_parameter_bounds_hold():
    """The norm's and a Linear's output bounds are at least the largest values they bound,
    whatever the input's scale and the norm's parameters."""
    k = jax.random.split(fresh_key(), 5)
    width = 64
    norm = nnx.LayerNorm(width, epsilon=1e-6, rngs=nnx.Rngs(0))
    norm.scale[...] = 1 + jax.random.normal(k[0], (width,))
    norm.bias[...] = jax.random.normal(k[1], (width,))
    x = 100 * jax.random.normal(k[2], (512, width))
    x = x.at[0].set(jnp.zeros(width).at[3].set(1e4))  # one row that is a single spike
    y = norm(x)
    norm_max, norm_l2 = fp8.norm_bounds(norm, width)
    assert float(jnp.max(jnp.abs(y))) <= float(norm_max)
    assert float(jnp.max(jnp.linalg.norm(y, axis=-1))) <= float(norm_l2)
    kernel = 0.02 * jax.random.normal(k[3], (width, 96))
    bias = 0.1 * jax.random.normal(k[4], (96,))
    assert float(jnp.max(jnp.abs(y @ kernel + bias))) <= float(
        fp8.output_bound(kernel, bias, norm_l2)
    )


def test_block_bounds_hold_and_are_reached(monkeypatch):
    """On tokens built to reach them, each of a block's four activation bounds is within 2% of
    the activation's largest value and never below it: the bounds are the right ones, in the
    right places. Every token is one spike (its normalised row puts all of sqrt(width) in one
    entry), and in each Linear one column is that entry alone (Cauchy-Schwarz is then equal).
    The activations are left unrounded: the bounds are proven for exact values (rounding may
    step past one, which the clip absorbs)."""
    width, hidden, spike = 64, 128, 5
    block = vit.Block(
        width, 2, hidden, attention.reference_attention, dtype=jnp.float32,
        residual_dtype=jnp.float32, rngs=nnx.Rngs(fresh_key()),
    )  # fmt: skip
    block.fp8_matmuls = True
    block.norm2.scale[...] = jnp.full((width,), 1.5)  # so fc1's bound differs from q/k/v's
    block.attn.qkv.kernel[...] = block.attn.qkv.kernel[...].at[spike, 2 * width].set(3.0)  # a v
    block.attn.proj.kernel[...] = jnp.zeros((width, width))  # norm2 then sees the spike rows too
    block.fc1.kernel[...] = block.fc1.kernel[...].at[spike, 7].set(2.0)
    checked = []

    def recording(x, bound=None):
        if bound is not None:
            checked.append((float(jnp.max(jnp.abs(x))), float(bound)))
        return x

    monkeypatch.setattr(fp8, "quantize_dequantize", recording)
    block(jnp.zeros((2, 8, width)).at[:, :, spike].set(10.0))
    names = ["q input", "k input", "v input", "attention output", "fc1 input", "GELU output"]
    assert len(checked) == len(names)
    for name, (amax, bound) in zip(names, checked, strict=True):
        assert 0.98 * bound <= amax <= bound, (name, amax, bound)
    assert checked[4][1] > 1.4 * checked[0][1]  # norm2's bound, not norm1's


def test_dense_against_float32():
    """Error well above bf16's (FP8 really runs) and within e4m3's."""
    layer = nnx.Linear(256, 128, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    layer.kernel[...] = 0.02 * jax.random.normal(fresh_key(), (256, 128))
    x = jax.random.normal(fresh_key(), (64, 256), jnp.float32)
    want = jnp.dot(x, layer.kernel[...], precision="highest")
    got = fp8.dense(layer, x, 4 * jnp.max(jnp.abs(x)))
    assert got.dtype == jnp.bfloat16
    assert 3 * rel_err(layer(x), want) < rel_err(got, want) < 6e-2


def test_with_fp8_matmuls_changes_only_the_copy():
    encoder = models.create("vit_t16", attention="xla", image_size=64, seed=0).encoder
    copy = models.with_fp8_matmuls(encoder)
    with pytest.raises(ValueError, match="compute every row"):
        copy.blocks(jnp.zeros((1, 16, 192)), first_query=4)
    assert copy.blocks.layers.fp8_matmuls and not encoder.blocks.layers.fp8_matmuls
    for a, b in zip(
        jax.tree.leaves(nnx.state(encoder)), jax.tree.leaves(nnx.state(copy)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    images = jax.random.normal(fresh_key(), (2, 64, 64, 3), jnp.float32)
    want = models.create("vit_t16", attention="xla", image_size=64, dtype="float32").encoder
    with jax.default_matmul_precision("highest"):
        want = want(images)
    bf16, fp8_err = rel_err(encoder(images), want), rel_err(copy(images), want)
    assert 3 * bf16 < fp8_err < 0.06, (bf16, fp8_err)


def test_the_startup_line_says_whether_fp8_gemms_run():
    assert "as FP8 GEMMs" in fp8.describe((9, 0))
    assert "as FP8 GEMMs" in fp8.describe((8, 9))
    for capability, device in [((8, 0), "this GPU"), (None, "this device")]:
        line = fp8.describe(capability)
        assert f"{device} has no FP8 tensor cores" in line and "slower" in line, line


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
    """XLA's rewriter turns each q-dq matmul into a cuBLASLt FP8 GEMM (Hopper and later)."""
    encoder = models.create("vit_s16", attention="cudnn", image_size=64, seed=0).encoder
    graphdef, params = nnx.split(models.with_fp8_matmuls(encoder))
    images = jnp.zeros((8, 64, 64, 3), jnp.float32)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    options = fp8.compiler_options({"fp8": "target"})  # q, k and v not merged into one GEMM
    hlo = forward.lower(params, images).compile(options).as_text()
    depth = encoder.blocks.depth
    fp8_gemms = sum("cublas$lt$matmul$f8" in line for line in hlo.splitlines())
    assert fp8_gemms == 6 * depth, hlo[:3000]  # q, k, v, proj, fc1, fc2


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles for a CUDA GPU")
def test_with_the_tanh_gelu_fc1s_fp8_gemm_writes_fc2s_e4m3_input():
    """fc1 + bias + tanh GELU + rounding for fc2 as one FP8 GEMM with an e4m3 output, within
    e4m3's rounding of the unfused form."""
    model = models.create("vit_s16", attention="cudnn", image_size=64, gelu="tanh", seed=0)
    graphdef, params = nnx.split(models.with_fp8_matmuls(model.encoder))
    images = jax.random.normal(fresh_key(), (8, 64, 64, 3), jnp.float32)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    hlo = forward.lower(params, images).compile(fp8.compiler_options({"fp8": "target"})).as_text()
    calls = [line for line in hlo.splitlines() if "cublas$lt$matmul$f8" in line]
    e4m3_out = [line for line in calls if re.search(r"= \(f8e4m3fn\[", line)]
    assert len(e4m3_out) == model.encoder.blocks.depth, "\n".join(calls)
    plain = models.create("vit_s16", attention="cudnn", image_size=64, seed=0).encoder
    assert rel_err(forward(params, images), plain(images)) < 0.2  # FP8's own error, not a fault
