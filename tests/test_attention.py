"""The attention seam: implementations agree, padding is ignored, the choice is reported."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import rel_err

from jepa_jax import attention as A


def _qkv(seed, b, t, n, h, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (b, t, n, h), jnp.float32).astype(dtype) for k in keys]


def _lengths(seed, b, t):
    return jnp.asarray(np.random.default_rng(seed).integers(1, t + 1, b), jnp.int32)


@pytest.mark.parametrize("t,h", [(49, 64), (60, 24), (17, 32)])
def test_xla_matches_reference_fp32(t, h):
    seed = np.random.SeedSequence().entropy % 2**31
    q, k, v = _qkv(seed, 3, t, 4, h)
    assert rel_err(A.xla_attention(q, k, v), A.reference_attention(q, k, v)) < 1e-5
    lengths = _lengths(seed, 3, t)
    ref = A.reference_attention(q, k, v, kv_lengths=lengths)
    assert rel_err(A.xla_attention(q, k, v, kv_lengths=lengths), ref) < 1e-5


def test_kv_lengths_ignore_padding():
    """Attention over a padded sequence equals attention over the real tokens alone."""
    q, k, v = _qkv(1, 2, 12, 2, 8)
    lengths = jnp.array([5, 12], jnp.int32)
    for fn in (A.reference_attention, A.xla_attention):
        out = fn(q, k, v, kv_lengths=lengths)
        alone = fn(q[:1], k[:1, :5], v[:1, :5])
        np.testing.assert_allclose(out[0], alone[0], rtol=1e-5, atol=1e-6)
        garbage = k.at[0, 5:].set(1e4), v.at[0, 5:].set(-1e4)
        np.testing.assert_allclose(fn(q, *garbage, kv_lengths=lengths), out, rtol=1e-5, atol=1e-6)


def test_resolve_and_report_on_cpu():
    if jax.default_backend() == "gpu":
        pytest.skip("CPU behaviour")
    auto = A.resolve("auto", dtype=jnp.bfloat16, head_dims=(64,))
    assert auto.name == "reference" and "no CUDA GPU" in auto.reason
    line = A.describe(auto, {"encoder": 12, "target encoder": 12, "predictor": 6})
    assert line.startswith("Attention: reference in 30 attention layers")
    assert "requested auto" in line
    with pytest.raises(A.AttentionUnavailableError, match="attention=cudnn cannot run here"):
        A.resolve("cudnn", dtype=jnp.bfloat16, head_dims=(64,))
    assert A.resolve("xla", dtype=jnp.float32, head_dims=(64,)).name == "xla"
    with pytest.raises(ValueError, match="config.model.attention='flash'"):
        A.resolve("flash", dtype=jnp.float32, head_dims=(64,))
    status = A.status()
    assert status["xla"] is None and status["reference"] is None and status["cudnn"]


def test_startup_line_printed_once(capsys):
    choice = A.Choice("xla", "xla")
    A.log_startup(choice, {"encoder": 2, "predictor": 1})
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["Attention: xla in 3 attention layers (encoder 2, predictor 1)"]


# ---- GPU: cuDNN flash attention against a float32 reference ------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("t", [49, 63, 196, 197, 257])
@pytest.mark.parametrize("h", [24, 32, 64, 80, 128])
@pytest.mark.parametrize("padded", [False, True])
def test_cudnn_matches_reference_bf16(t, h, padded):
    seed = np.random.SeedSequence().entropy % 2**31
    q, k, v = _qkv(seed, 4, t, 4, h)
    lengths = _lengths(seed, 4, t) if padded else None
    cotangent = jax.random.normal(jax.random.key(seed + 1), q.shape)

    def loss(fn, dtype):
        def f(q, k, v):
            out = fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), kv_lengths=lengths)
            if lengths is not None:  # padded query rows are don't-care
                out = out * (jnp.arange(t)[None, :, None, None] < lengths[:, None, None, None])
            return (out.astype(jnp.float32) * cotangent).sum(), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, out), grads = loss(A.cudnn_attention, jnp.bfloat16)(q, k, v)
    with jax.default_matmul_precision("highest"):
        (_, ref), ref_grads = loss(A.reference_attention, jnp.float32)(q, k, v)
    assert rel_err(out, ref) < 2e-2
    for g, rg in zip(grads, ref_grads, strict=True):
        assert rel_err(g, rg) < 3e-2


@pytest.mark.gpu
def test_cudnn_available_and_chosen_by_auto():
    assert A.status()["cudnn"] is None
    assert A.resolve("auto", dtype=jnp.bfloat16, head_dims=(80, 24)).name == "cudnn"
    fallback = A.resolve("auto", dtype=jnp.float32, head_dims=(80,))
    assert fallback.name == "reference" and "float32" in fallback.reason
