"""The residual add + LayerNorm kernel: what it computes, its backward, and the blocks using it.

On a CPU the kernel runs in Pallas' interpreter (same program, interpreted); the GPU tests
compile it with Triton."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jepa_jax import attention
from jepa_jax.kernels import add_norm as add_norm_kernel
from jepa_jax.models import layers, vit

ON_GPU = jax.default_backend() == "gpu"
EPS = 1e-6


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert not np.isnan(x).any(), "NaN never passes"
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _fresh_key():
    seed = np.random.SeedSequence().entropy % 2**31
    print(f"seed {seed}")  # shown with a failure, to reproduce it
    return jax.random.key(seed)


def _inputs(key, rows, width):
    kx, kh, ks, kb = jax.random.split(key, 4)
    x = jax.random.normal(kx, (rows, width)) * 2 + 0.5  # a stream with a non-zero mean
    h = jax.random.normal(kh, (rows, width), jnp.bfloat16)
    return x, h, 1 + jax.random.normal(ks, (width,)) * 0.2, jax.random.normal(kb, (width,)) * 0.2


def _reference(x, h, scale, bias):
    """float64 NumPy: the stream, the normalised rows, their means and 1/std."""
    s = np.asarray(x, np.float64) + np.asarray(h.astype(jnp.float32), np.float64)
    mean = s.mean(axis=1)
    rstd = 1 / np.sqrt(s.var(axis=1) + EPS)
    y = (s - mean[:, None]) * rstd[:, None] * np.asarray(scale, np.float64) + np.asarray(bias)
    return s, y, mean, rstd


def _check_kernel(rows, width, out_dtype, interpret):
    x, h, scale, bias = _inputs(_fresh_key(), rows, width)
    got = add_norm_kernel.add_norm(
        x, h, scale, bias, eps=EPS, out_dtype=out_dtype, interpret=interpret
    )
    want = _reference(x, h, scale, bias)
    assert [g.dtype for g in got] == [jnp.float32, out_dtype, jnp.float32, jnp.float32]
    assert [g.shape for g in got] == [w.shape for w in want]
    # The add is one float32 rounding, as XLA's; every row was written (fresh inputs each run).
    np.testing.assert_array_equal(got[0], x + h.astype(jnp.float32))
    assert rel_err(got[1], want[1]) < (1e-2 if out_dtype == jnp.bfloat16 else 1e-5)
    assert rel_err(got[2], want[2]) < 1e-5 and rel_err(got[3], want[3]) < 1e-5


@pytest.mark.parametrize(
    "rows,width,out_dtype",
    [(37, 192, jnp.bfloat16), (8, 384, jnp.float32), (5, 1280, jnp.bfloat16)],
)
def test_kernel_matches_a_float64_reference(rows, width, out_dtype):
    """Row counts that leave a partial block of rows; widths that are not powers of two."""
    _check_kernel(rows, width, out_dtype, interpret=not ON_GPU)


def _interpreted(monkeypatch):
    """Count the kernel's calls; on a CPU, run it in the interpreter."""
    calls = []
    kernel = add_norm_kernel.add_norm

    def counted(*args, **kw):
        calls.append(args[0].shape)
        return kernel(*args, **kw, interpret=not ON_GPU)

    monkeypatch.setattr(add_norm_kernel, "add_norm", counted)
    return calls


def test_the_fused_layer_matches_autodiff_of_add_then_norm(monkeypatch):
    """Values and the custom backward (XLA) against autodiff of x + h followed by LayerNorm."""
    calls = _interpreted(monkeypatch)
    key = _fresh_key()
    x, h, _, _ = _inputs(key, 24, 384)
    x, h = x.reshape(2, 12, 384), h.reshape(2, 12, 384)
    norm = vit._layer_norm(384, jnp.float32, nnx.Rngs(0))
    norm.scale[...], norm.bias[...] = _inputs(key, 1, 384)[2:]
    graphdef, params = nnx.split(norm)
    weights = jax.random.normal(key, (2, 2, 12, 384))

    def run(fused):
        def loss(params, x, h):
            s, y = layers.add_norm(nnx.merge(graphdef, params), x, h, jnp.bfloat16, fused)
            return jnp.vdot(s, weights[0]) + jnp.vdot(y.astype(jnp.float32), weights[1]), (s, y)

        (_, outs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, h)
        return [*outs, *jax.tree.leaves(grads)]

    got, want = run(True), run(False)
    assert calls == [(24, 384)]  # the fused path ran, once (the value and its gradient)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < 1e-2  # y and the gradient of h are bf16


def test_a_fused_encoder_computes_what_the_plain_one_does(monkeypatch):
    """The whole encoder (every block's adds in the next LayerNorm, the last in the final
    norm) in float32 compute, so the two paths differ by float32 roundings only."""
    calls = _interpreted(monkeypatch)
    key = _fresh_key()
    images = jax.random.normal(key, (2, 32, 32, 3))

    def run(fused):
        encoder = vit.VisionTransformer(
            vit.ViTSize(64, 2, 2, 128),
            patch_size=8,
            image_size=32,
            attn_fn=attention.get("reference"),
            fused_norm=fused,
            rngs=nnx.Rngs(0),
        )
        graphdef, params = nnx.split(encoder)

        def loss(params):
            out = nnx.merge(graphdef, params)(images)
            return jnp.sum(jnp.sin(out)), out

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return out, grads

    (got, got_grads), (want, want_grads) = run(True), run(False)
    assert calls and set(calls) == {(2 * 16, 64)}  # the kernel ran, on all 16 tokens x 2
    assert rel_err(got, want) < 1e-5
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert g.shape == w.shape and rel_err(g, w) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="compiles the kernel with Triton: needs a CUDA GPU")
@pytest.mark.parametrize(
    "rows,width,out_dtype",
    [(128 * 68, 1280, jnp.bfloat16), (4099, 768, jnp.bfloat16), (517, 384, jnp.float32)],
)
def test_compiled_kernel_matches_a_float64_reference(rows, width, out_dtype):
    for _ in range(2):  # fresh inputs again: a row left unwritten would keep the old values
        _check_kernel(rows, width, out_dtype, interpret=False)

