"""The GELU kernel (`kernels.gelu`): its erf against float64, the kernel against the model's
GELU (interpreted on a CPU, compiled on a GPU), and `config.model.gelu_kernel`'s resolution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from meshes import mesh_of
from numerics import bfloat16_spacing, every_bfloat16, fresh_key, gelu_float64, rel_err

from configs.default import get_config
from jepa_jax import attention, configuration, kernels, models, sharding, trainer
from jepa_jax.kernels import gelu as gelu_kernel
from jepa_jax.models import activations, vit

ON_GPU = jax.default_backend() == "gpu"


def test_it_is_within_bf16_rounding_of_the_exact_gelu_at_every_bf16_input():
    """Its float32 formula, and the kernel itself (rounded to bf16), at all 65,536 bf16 values."""
    x = every_bfloat16()
    finite = np.isfinite(x.astype(np.float32))
    xf = x.astype(np.float32)[finite]
    got = np.asarray(gelu_kernel.gelu_float32(jnp.asarray(xf)), np.float64)
    exact, _ = gelu_float64(xf)
    assert np.isfinite(got).all()
    # A&S 7.1.26 errs by under 1.5e-7 in erf, so by under 0.75e-7 |x| here, plus float32's
    # rounding through a dozen operations, rsqrt's and exp2's a few ulp each (results below
    # 1e-37 may flush to zero): far below bf16's 2^-8.
    assert (np.abs(got - exact) <= 1e-6 * np.abs(xf) + 1e-37).all()
    rounded = np.asarray(gelu_kernel.gelu(jnp.asarray(x), interpret=not ON_GPU), np.float64)
    assert not np.isnan(rounded[finite]).any()
    ulp = bfloat16_spacing(np.maximum(np.abs(exact), 1e-37))
    # Within one bf16 step, except in the far negative tail (x < -6, |gelu| < 1e-8), where
    # A&S's tail carries up to 0.5% relative error, 2e-11 absolute (XLA's 1 + erf gives 0).
    assert (np.abs(rounded[finite] - exact) <= ulp + 2e-11).all()


def _random(shape):
    return (jax.random.normal(fresh_key(), shape) * 3).astype(jnp.bfloat16)


@pytest.mark.parametrize("shape", [(2, 8, 1024), (8, 3072)])
def test_the_kernel_matches_the_models_gelu(shape):
    x = _random(shape)
    got = gelu_kernel.gelu(x, interpret=not ON_GPU)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert rel_err(got, activations.gelu(x)) < 1e-3  # both float32 inside, rounded to bf16


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(128, 196, 3072), (512, 91, 1536), (128, 68, 5120)])
def test_compiled_kernel_at_the_step_shapes(shape):
    x = _random(shape)
    assert gelu_kernel.fits(x.shape)
    assert rel_err(jax.jit(gelu_kernel.gelu)(x), activations.gelu(x)) < 1e-3


@pytest.fixture
def kernel_here(monkeypatch):
    """The model's calls of the kernel, interpreted by Pallas where no GPU compiles it."""
    if not ON_GPU:
        monkeypatch.setattr(
            gelu_kernel, "gelu", functools.partial(gelu_kernel.gelu, interpret=True)
        )


def test_in_the_model_it_keeps_the_backward_and_falls_back_where_blocks_do_not_tile(
    kernel_here,
):
    for shape, tiles in (((8, 1024), True), ((4, 1024), False)):
        x, g = _random(shape), _random(shape)
        assert gelu_kernel.fits(x.shape) == tiles
        assert ("pallas_call" in str(jax.make_jaxpr(activations.gelu_in_kernel)(x))) == tiles
        out, vjp = jax.vjp(activations.gelu_in_kernel, x)
        want, want_vjp = jax.vjp(activations.gelu, x)
        assert rel_err(out, want) < 1e-3
        assert (vjp(g)[0] == want_vjp(g)[0]).all()  # the same backward, exactly
        if not tiles:
            assert (out == want).all()  # XLA's GELU itself


def test_a_block_with_the_kernel_computes_what_it_computes_without(kernel_here):
    x = _random((2, 16, 256)).astype(jnp.float32)
    outs = []
    for on in (False, True):
        block = vit.Block(
            256,
            4,
            1024,
            attention.get("reference"),
            dtype=jnp.bfloat16,
            residual_dtype=jnp.float32,
            activation=activations.for_mlp(kernels.GeluKernel(on)),
            rngs=nnx.Rngs(0),
        )
        assert block.gelu is (activations.gelu_in_kernel if on else activations.gelu)
        outs.append(jax.grad(lambda x, b=block: jnp.sum(b(x) ** 2))(x))
    assert rel_err(outs[1], outs[0]) < 1e-2


def test_settings_resolve_and_bad_ones_are_refused(monkeypatch):
    assert get_config("tiny").model.gelu_kernel == "auto"
    assert kernels.setting({}, "gelu_kernel") == "off"  # configs before the field
    off = kernels.resolve_gelu("off")
    assert not off.on and off.describe() == "GELU: XLA (config.model.gelu_kernel=off)"
    with pytest.raises(ValueError, match="gelu_kernel='yes'"):
        kernels.resolve_gelu("yes")
    config = get_config("tiny")
    config.model.gelu_kernel = "yes"
    with pytest.raises(ValueError, match="model.gelu_kernel"):
        configuration.validate(config)
    # Where a GPU passed the check: on.
    monkeypatch.setattr(kernels, "_gpu_reason", lambda: None)
    monkeypatch.setattr(kernels, "_gelu_check", lambda: None)
    assert kernels.resolve_gelu("auto").on and kernels.resolve_gelu("on").on
    assert "Pallas kernel" in kernels.resolve_gelu("auto").describe()


@pytest.mark.skipif(ON_GPU, reason="CPU behaviour")
def test_without_a_gpu_auto_uses_xla_and_on_says_why():
    auto = kernels.resolve_gelu("auto")
    assert not auto.on and auto.reason.startswith("no CUDA GPU")
    with pytest.raises(kernels.KernelUnavailableError, match="no CUDA GPU.*gelu_kernel=auto"):
        kernels.resolve_gelu("on")
    assert "failed its startup check" in kernels._gelu_check.__wrapped__()


@pytest.mark.gpu
def test_on_a_gpu_it_passes_its_startup_check():
    assert kernels._gelu_check.__wrapped__() is None
    assert kernels.resolve_gelu("auto").on


@pytest.mark.parametrize("scan", [False, True])
def test_every_block_of_the_three_networks_gets_the_choice(scan):
    m = get_config("tiny").model
    m.scan_layers = scan

    def networks():
        ijepa = models.from_config(m, gelu_kernel=kernels.GeluKernel(True))
        return ijepa.encoder, ijepa.target_encoder, ijepa.predictor

    for network in nnx.eval_shape(networks):
        assert network.blocks.layers.gelu is activations.gelu_in_kernel


_TWO = pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices")


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=_TWO)])
def test_the_trainer_runs_it_on_any_mesh(monkeypatch, devices):
    monkeypatch.setattr(kernels, "_gpu_reason", lambda: None)
    monkeypatch.setattr(kernels, "_gelu_check", lambda: None)
    config = get_config("tiny")
    config.mesh.data = devices
    net, _, _ = trainer.build(config, sharding.make_mesh(config.mesh, jax.devices()[:devices]))
    assert net.gelu_kernel.on


@_TWO
def test_on_a_mesh_each_device_runs_the_kernel_on_its_own_rows(monkeypatch):
    """Split over two devices, [4, 8, 1024] is [2, 8, 1024] a device: the kernel's blocks tile
    it. [2, 4, 1024] tiles whole but not per device ([1, 4, 1024]): XLA's GELU."""
    kernel, shapes = gelu_kernel.gelu, []

    def interpreted(x):
        shapes.append(x.shape)
        return kernel(x, interpret=not ON_GPU)

    monkeypatch.setattr(gelu_kernel, "gelu", interpreted)
    mesh = mesh_of(data=1, fsdp=2)
    for shape, kernel_shapes in [((4, 8, 1024), [(2, 8, 1024)]), ((2, 4, 1024), [])]:
        x, shapes[:] = _random(shape), []
        with jax.set_mesh(mesh):
            got = jax.jit(activations.gelu_in_kernel)(
                jax.device_put(x, sharding.batch_sharding(mesh))
            )
        assert shapes == kernel_shapes
        assert got.sharding.spec == sharding.batch_sharding(mesh).spec
        assert rel_err(got, activations.gelu(x)) < 1e-3
