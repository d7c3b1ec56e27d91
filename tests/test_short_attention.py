"""The short-sequence attention backward kernel against autodiff of the float32 reference.

On a CPU the kernel runs in Pallas' interpreter (the same program, interpreted); the GPU test
compiles it with Triton at ViT-H/14's context and predictor shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jepa_jax.attention import reference_attention
from jepa_jax.kernels import short_attention

ON_GPU = jax.default_backend() == "gpu"


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert not np.isnan(x).any(), "NaN never passes"
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _check(batch, tokens, heads, head_dim, interpret):
    seed = np.random.SeedSequence().entropy % 2**31
    print(f"seed {seed}")  # shown with a failure, to reproduce it
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k, v, do = (jax.random.normal(key, (batch, tokens, heads, head_dim)) for key in keys[:4])
    q, k, v, do = (a.astype(jnp.bfloat16).astype(jnp.float32) for a in (q, k, v, do))
    lengths = jax.random.randint(keys[4], (batch,), 1, tokens + 1)
    _, vjp = jax.vjp(lambda *a: reference_attention(*a, kv_lengths=lengths), q, k, v)
    got = short_attention.attention_backward(
        *(a.astype(jnp.bfloat16) for a in (q, k, v, do)),
        lengths,
        scale=head_dim**-0.5,
        interpret=interpret,
    )
    for g, want in zip(got, vjp(do), strict=True):
        assert g.dtype == jnp.bfloat16 and g.shape == want.shape
        assert rel_err(g, want) < 1e-2  # bf16 operands, float32 arithmetic


@pytest.mark.parametrize("tokens,head_dim", [(13, 24), (72, 80), (128, 32)])
def test_backward_matches_autodiff_of_the_float32_reference(tokens, head_dim):
    """Token counts and head dims that are not powers of two, and random key lengths down to
    one key (padded keys get no gradient and no probability)."""
    _check(3, tokens, 2, head_dim, interpret=not ON_GPU)


def test_longer_sequences_are_refused():
    x = jnp.zeros((1, 129, 1, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="at most 128"):
        short_attention.attention_backward(x, x, x, x, jnp.ones((1,)), scale=0.25)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="compiles the kernel with Triton: needs a CUDA GPU")
@pytest.mark.parametrize("batch,tokens,head_dim", [(64, 72, 80), (128, 128, 24)])
def test_compiled_backward_at_the_step_shapes(batch, tokens, head_dim):
    for _ in range(2):  # fresh inputs again: a slab left unwritten would keep the old values
        _check(batch, tokens, 16, head_dim, interpret=False)
