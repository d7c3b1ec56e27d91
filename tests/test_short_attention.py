"""The short-sequence attention backward kernel against autodiff of the float32 reference.

On a CPU the kernel runs in Pallas' interpreter (the same program, interpreted); the GPU test
compiles it with Triton at ViT-H/14's context and predictor shapes."""

import jax
import jax.numpy as jnp
import pytest
from meshes import mesh_of
from numerics import fresh_key, rel_err

from configs.default import get_config
from jepa_jax import attention as A
from jepa_jax import configuration, kernels, models, sharding, trainer
from jepa_jax.attention import reference_attention
from jepa_jax.evaluate import features
from jepa_jax.kernels import short_attention

ON_GPU = jax.default_backend() == "gpu"
vit_size = models.encoder_size(get_config("tiny").model)


def _grads(fn, q, k, v, g, lengths):
    """Gradients for q, k, v of <fn(q, k, v), g>, in float32."""

    def loss(q, k, v):
        return jnp.vdot(fn(q, k, v, kv_lengths=lengths).astype(jnp.float32), g.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _check(batch, tokens, heads, head_dim, interpret):
    keys = jax.random.split(fresh_key(), 5)
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


# --- the kernel as cuDNN attention's backward: choice, startup line, gradients ---

CUDNN = A.Choice("auto", "cudnn")


@pytest.fixture
def kernel_here(monkeypatch):
    """Pretend the kernel passed its startup check here, to test the choice on any machine."""
    monkeypatch.setattr(kernels, "_short_backward_check", lambda: None)


def test_auto_by_default_off_keeps_cudnn_and_bad_settings_are_refused():
    assert get_config("tiny").model.short_attention_backward == "auto"
    assert kernels.resolve_short_backward("off", CUDNN) is CUDNN
    assert kernels.setting({}, "short_attention_backward") == "off"  # configs before the field
    assert not CUDNN.short_backward and CUDNN.fn is A.cudnn_attention
    with pytest.raises(ValueError, match="short_attention_backward='yes'"):
        kernels.resolve_short_backward("yes", CUDNN)
    config = get_config("tiny")
    config.model.short_attention_backward = "yes"
    with pytest.raises(ValueError, match="model.short_attention_backward"):
        configuration.validate(config)


def test_auto_runs_the_kernel_with_cudnn(kernel_here):
    choice = kernels.resolve_short_backward("auto", CUDNN)
    assert choice.short_backward
    line = A.describe(choice, {"encoder": 12, "predictor": 6})
    assert "requested" not in line  # auto chose cuDNN: nothing fell back
    assert choice.fn is A.cudnn_attention_short_backward and "in a Pallas kernel" in line
    with pytest.raises(kernels.KernelUnavailableError, match="short_attention_backward=auto"):
        kernels.resolve_short_backward("on", A.Choice("xla", "xla"))


@pytest.mark.parametrize("devices", [1, 2])
def test_the_trainer_runs_it_on_any_mesh(monkeypatch, kernel_here, devices):
    """`trainer.build` passes the setting and its mesh's size; cuDNN is faked (nothing runs it:
    build only creates the state)."""
    monkeypatch.setattr(A, "resolve", lambda name, dtype, head_dims: CUDNN)
    config = get_config("tiny")
    config.model.short_attention_backward = "auto"
    config.mesh.data = devices
    net, _, _ = trainer.build(config, sharding.make_mesh(config.mesh, jax.devices()[:devices]))
    assert net.attention.short_backward


@pytest.mark.skipif(ON_GPU, reason="CPU behaviour")
def test_without_a_gpu_auto_keeps_cudnns_backward_and_on_says_why():
    choice = models.resolve_attention(vit_size, 384, "auto", "bfloat16", short_backward="auto")
    assert not choice.short_backward and choice.short_backward_reason is None
    assert "short-sequence" not in A.describe(choice, {"encoder": 1})  # no cuDNN, nothing to say
    with pytest.raises(kernels.KernelUnavailableError, match="short_attention_backward=on, but"):
        models.resolve_attention(vit_size, 384, "auto", "bfloat16", short_backward="on")
    # The startup check itself fails cleanly where Triton cannot compile, also when first asked
    # inside a trace (its float32 reference is computed concretely even there).
    assert "failed its startup check" in kernels._short_backward_check.__wrapped__()
    inside = []
    jax.eval_shape(lambda x: inside.append(kernels._short_backward_check.__wrapped__()) or x, 0.0)
    assert "failed its startup check" in inside[0]


@pytest.mark.parametrize(
    "tokens,with_lengths,batch,devices",
    [(13, True, 2, 1), (16, False, 2, 1), (130, True, 2, 1), (13, True, 2, 2), (13, True, 3, 2)],
)
def test_its_gradients_match_autodiff_of_the_reference(
    monkeypatch, tokens, with_lengths, batch, devices
):
    """cudnn_attention_short_backward with cuDNN's forward swapped for the reference (so this
    runs on a CPU): the kernel's backward on unpadded sequences of up to 128 tokens, and
    beyond, padding to a multiple of 8 and autodiff's. The kernel runs interpreted on a CPU.
    On a mesh of two devices, each runs it on its own sequence; 3 sequences do not split over
    two devices, and keep cuDNN's backward (the kernel would get all of them on each)."""
    monkeypatch.setattr(
        A, "_cudnn", lambda q, k, v, n: A.reference_attention(q, k, v, kv_lengths=n)
    )
    kernel, calls = short_attention.attention_backward, []

    def counted(*args, **kw):
        calls.append(args[0].shape)
        return kernel(*args, **kw, interpret=not ON_GPU)

    monkeypatch.setattr(short_attention, "attention_backward", counted)
    keys = jax.random.split(fresh_key(), 5)
    shape = (batch, tokens, 2, 24)
    q, k, v, g = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys[:4])
    lengths = jax.random.randint(keys[4], (batch,), 1, tokens + 1) if with_lengths else None
    with jax.set_mesh(mesh_of(data=1, fsdp=devices)):
        got = _grads(A.cudnn_attention_short_backward, q, k, v, g, lengths)
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    want = _grads(A.reference_attention, *f32, g, lengths)
    assert A.seq_multiple(A.cudnn_attention_short_backward, tokens) == (1 if tokens <= 128 else 8)
    kernel_runs = tokens <= 128 and batch % devices == 0
    assert calls == ([(batch // devices, tokens, 2, 24)] if kernel_runs else [])
    for got_, want_ in zip(got, want, strict=True):
        assert got_.shape == want_.shape and rel_err(got_, want_) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="runs cuDNN and the compiled kernel: needs a CUDA GPU")
@pytest.mark.parametrize("tokens,head_dim", [(68, 80), (122, 24), (51, 64), (91, 32)])
def test_cudnn_with_the_kernel_backward_matches_cudnn(tokens, head_dim):
    """At H/14's context and predictor lengths and B/16's odd ones (cuDNN's forward unpadded),
    against cuDNN's own backward (padded)."""
    assert kernels._short_backward_check() is None  # the startup check passes here
    keys = jax.random.split(fresh_key(), 5)
    q, k, v, g = (
        jax.random.normal(key, (32, tokens, 16, head_dim), jnp.bfloat16) for key in keys[:4]
    )
    for lengths in (jax.random.randint(keys[4], (32,), tokens // 2, tokens + 1), None):
        out = jax.jit(A.cudnn_attention_short_backward)(q, k, v, kv_lengths=lengths)
        f32 = [a.astype(jnp.float32) for a in (q, k, v)]
        assert rel_err(out, A.reference_attention(*f32, kv_lengths=lengths)) < 1e-2
        got = _grads(A.cudnn_attention_short_backward, q, k, v, g, lengths)
        for got_, want in zip(got, _grads(A.cudnn_attention, q, k, v, g, lengths), strict=True):
            assert rel_err(got_, want) < 1e-2


def test_a_run_saved_with_the_kernel_on_evaluates_anywhere():
    """Features need no backward: the evaluation builds the encoder without the kernel."""
    config = get_config("tiny")
    config.model.short_attention_backward = config.model.gelu_kernel = "on"
    m = features.eval_model_config(config, "reference")
    assert m.short_attention_backward == "off" and m.gelu_kernel == "auto"
    assert models.from_config(m).attention.fn is A.reference_attention
