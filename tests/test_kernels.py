"""The fused q/k/v kernel: where it runs, what it computes, and its backward."""

import types

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from meshes import mesh_of
from numerics import fresh_key, rel_err

from jepa_jax import attention, kernels, sharding
from jepa_jax.kernels import dense
from jepa_jax.models import layers, vit

ON_GPU = jax.default_backend() == "gpu"


# The kernel's own tests need a GPU it runs on (Hopper, the startup check passed).
needs_the_kernel = pytest.mark.skipif(
    bool(kernels.unavailable_reason("bfloat16")),
    reason=f"the q/k/v kernel cannot run here: {kernels.unavailable_reason('bfloat16')}",
)


WIDTHS = {"encoders": 768, "predictor": 384}  # ViT-B/16's


def test_off_is_off_and_bad_settings_are_refused():
    assert not kernels.resolve("off", dtype="bfloat16", widths=WIDTHS).on
    with pytest.raises(ValueError, match="choose one of"):
        kernels.resolve("yes", dtype="bfloat16", widths=WIDTHS)


@pytest.mark.skipif(ON_GPU, reason="checks the no-GPU branch")
def test_without_a_gpu_auto_falls_back_and_on_says_why_and_what_to_do():
    auto = kernels.resolve("auto", dtype="bfloat16", widths=WIDTHS)
    assert not auto.on and "no CUDA GPU" in auto.reason
    assert auto.describe().startswith("Fused q/k/v: off (no CUDA GPU")
    with pytest.raises(kernels.KernelUnavailableError, match="no CUDA GPU.*fused_qkv=auto"):
        kernels.resolve("on", dtype="bfloat16", widths=WIDTHS)


@pytest.fixture
def one_hopper(monkeypatch):
    """This process seen as one Hopper GPU whose kernel passes its startup check."""
    gpu = types.SimpleNamespace(platform="gpu", compute_capability="9.0")
    monkeypatch.setattr(jax, "devices", lambda *_: [gpu])
    monkeypatch.setattr(kernels, "_self_check", lambda: None)
    return gpu


@pytest.mark.parametrize(
    "capability,dtype,reason",
    [
        ("9.0", "bfloat16", None),
        ("8.0", "bfloat16", "compute capability 8.0"),
        ("9.0", "float32", "compute dtype float32"),
    ],
)
def test_auto_runs_only_on_hopper_gpus_in_bf16(one_hopper, capability, dtype, reason):
    one_hopper.compute_capability = capability
    choice = kernels.resolve("auto", dtype=dtype, widths=WIDTHS)
    assert choice.on == (reason is None)
    if reason:
        assert reason in choice.reason


def test_the_startup_line_names_the_networks_whose_width_it_tiles(one_hopper):
    both = kernels.resolve("auto", dtype="bfloat16", widths=WIDTHS)
    assert both.describe().startswith("Fused q/k/v: on in the encoders and the predictor (")
    widths = {"encoders": 192, "predictor": 384}  # ViT-Ti's 192 does not tile
    assert kernels.resolve("auto", dtype="bfloat16", widths=widths).networks == ("predictor",)
    tiny = {"encoders": 192, "predictor": 128}
    auto = kernels.resolve("auto", dtype="bfloat16", widths=tiny)
    assert not auto.on and "encoders 192, predictor 128" in auto.reason
    with pytest.raises(kernels.KernelUnavailableError, match="tiles none of these widths"):
        kernels.resolve("on", dtype="bfloat16", widths=tiny)


def test_a_kernel_that_fails_its_startup_check_falls_back_to_xla(monkeypatch):
    """A jax whose Mosaic GPU API moved: `auto` says why and runs XLA instead of failing later."""

    def broken(*args, **kw):
        raise NotImplementedError("no lowering rule")

    monkeypatch.setattr(dense, "dense_split", broken)
    reason = kernels._self_check.__wrapped__()
    assert "startup check (NotImplementedError: no lowering rule)" in reason
    monkeypatch.setattr(dense, "dense_split", lambda x, w, b, splits: [x @ w[:, :128]] * splits)
    assert "wrong result" in kernels._self_check.__wrapped__()
    monkeypatch.setattr(dense, "dense_split", dense.reference)
    assert kernels._self_check.__wrapped__() is None
    inside = []  # first asked while building a model under a trace (eval_shape), it still runs
    jax.eval_shape(lambda x: inside.append(kernels._self_check.__wrapped__()) or x, jnp.zeros(1))
    assert inside == [None]


def test_tilings_fit_the_released_shapes_and_shared_memory():
    for m, k, n_out in [
        (8704, 1280, 1280),
        (62464, 384, 384),
        (25088, 768, 768),
    ]:
        t = dense.tiling_for(m, k, n_out)
        assert t is not None and n_out % t.tile_n == 0
        # Each ring slot is filled an even number of times per tile (the barrier phases).
        assert (k // t.tile_k) % (2 * t.stages) == 0 and t.stages >= 2
        smem = t.stages * (t.tile_m * t.tile_k + t.tile_k * t.tile_n) * 2
        assert smem + 8 * t.epi_m * t.epi_n <= dense._SMEM_BYTES
    assert dense.tiling_for(25088, 768, 768).stages == 6
    assert dense.tiling_for(8704, 1280, 1280).stages == 5  # the ring depth divides 20 / 2
    assert dense.tiling_for(100, 1280, 5120) is None  # rows not a multiple of 128: XLA
    assert dense.tiling_for(128, 1280, 192).tile_n == 64  # 64-wide column tiles
    assert not dense.width_tiles(192) and not dense.width_tiles(1408)  # ViT-Ti's, ViT-g's
    assert dense.tiling_for(128, 1280, 96) is None  # columns not a multiple of 64: XLA


def _layer_and_input(key, din, dout, rows):
    k1, k2, k3 = jax.random.split(key, 3)
    linear = nnx.Linear(din, dout, dtype=jnp.bfloat16, rngs=nnx.Rngs(k1))
    linear.bias[...] = jax.random.normal(k2, (dout,)) * 0.5
    return linear, jax.random.normal(k3, (2, rows // 2, din), jnp.float32)


def _values_and_grads(layer_fn, linear, x, key):
    """Outputs, and gradients for x, the kernel and the bias of a random projection of them."""
    graphdef, params = nnx.split(linear)
    outs = layer_fn(linear, x)
    weights = [
        jax.random.normal(k, o.shape)
        for k, o in zip(jax.random.split(key, len(outs)), outs, strict=True)
    ]

    def loss(params, x):
        ys = layer_fn(nnx.merge(graphdef, params), x)
        return sum(jnp.vdot(y.astype(jnp.float32), w) for y, w in zip(ys, weights, strict=True))

    grads = jax.grad(loss, argnums=(0, 1))(params, x)
    return outs, (grads[0]["kernel"][...], grads[0]["bias"][...], grads[1])


def _qkv(fused):
    return lambda linear, x: layers.linear_split(linear, x, 3, fused)


def test_fused_qkv_matches_autodiff_of_the_plain_layer(monkeypatch):
    """The custom backward (XLA) against autodiff of Linear + split; the kernel itself is
    swapped for `dense.reference`, its XLA statement, so this runs on any platform."""
    calls = []

    def kernel_stand_in(*args, **kw):
        calls.append(kw["splits"])
        return dense.reference(*args, **kw)

    monkeypatch.setattr(layers, "dense_split", kernel_stand_in)
    key = fresh_key()
    linear, x = _layer_and_input(key, 256, 768, rows=256)
    got, got_grads = _values_and_grads(_qkv(True), linear, x, key)
    assert calls == [3, 3]  # the fused path ran (forward, and the forward the gradient takes)
    want, want_grads = _values_and_grads(_qkv(False), linear, x, key)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < 1e-2
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < 2e-2


def test_on_a_mesh_each_device_runs_the_kernel_on_its_own_rows(monkeypatch):
    """Split over two devices, 512 rows are 256 a device: the kernel tiles them and runs on
    each device's; 128 rows are 64 a device, which no tiling takes: XLA's layer. Values and
    gradients (the weight's and bias's summed over the devices in float32) as the plain layer's
    on one device."""
    rows = []

    def kernel_stand_in(x, w, b, splits):
        rows.append(x.shape[0])
        return dense.reference(x, w, b, splits=splits)

    monkeypatch.setattr(layers, "dense_split", kernel_stand_in)
    key = fresh_key()
    for total, kernel_rows in [(512, [256]), (128, [])]:
        linear, x = _layer_and_input(key, 256, 768, rows=total)
        rows.clear()
        mesh = mesh_of(data=1, fsdp=2)
        with jax.set_mesh(mesh):
            split = jax.device_put(x, sharding.batch_sharding(mesh))
            got, got_grads = jax.jit(
                lambda x, linear=linear: _values_and_grads(_qkv(True), linear, x, key)
            )(split)
        assert rows == kernel_rows * 2  # the forward, and the forward the gradient takes
        want, want_grads = _values_and_grads(_qkv(False), linear, x, key)
        for g, w in zip(got, want, strict=True):
            assert g.sharding.spec == sharding.batch_sharding(mesh).spec
            assert rel_err(g, w) < 1e-2
        for g, w in zip(got_grads, want_grads, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype and rel_err(g, w) < 2e-2


@pytest.mark.parametrize("with_lengths", [False, True])
def test_attention_pads_its_input_once_and_computes_the_same(monkeypatch, with_lengths):
    """With the kernel on, a sequence whose length cuDNN would pad is padded before the q/k/v
    matmul instead of after it; masked as keys and sliced off as queries, the padding changes
    nothing. The kernel is swapped for `dense.reference` and the attention is the reference,
    told to pad as cuDNN does."""
    assert vit.seq_multiple(attention.get("reference"), 13) == 1  # other attentions: no padding
    monkeypatch.setattr(vit, "seq_multiple", lambda fn, tokens: attention.CUDNN_SEQ_MULTIPLE)
    calls = []

    def kernel_stand_in(*args, **kw):
        calls.append(args[0].shape)
        return dense.reference(*args, **kw)

    monkeypatch.setattr(layers, "dense_split", kernel_stand_in)
    key = fresh_key()
    batch, tokens, dim = 16, 13, 256
    x = jax.random.normal(key, (batch, tokens, dim))
    lengths = jax.random.randint(key, (batch,), 1, tokens + 1) if with_lengths else None

    def run(fused):
        attn = vit.Attention(
            dim,
            4,
            attention.get("reference"),
            dtype=jnp.float32,  # so the two paths differ only by the padding, not by roundings
            fused_qkv=fused,
            rngs=nnx.Rngs(0),
        )
        graphdef, params = nnx.split(attn)

        def loss(params, x):
            y = nnx.merge(graphdef, params)(x, lengths)
            return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, grads

    (got, got_grads), (want, want_grads) = run(True), run(False)
    assert calls == [(batch * 16, dim)]  # padded to 16 tokens, once, before the matmul
    assert got.shape == want.shape == (batch, tokens, dim)
    assert rel_err(got, want) < 1e-5
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert g.shape == w.shape and rel_err(g, w) < 1e-5


@pytest.mark.parametrize(
    "fn,batch,tokens,multiple",
    [
        (attention.cudnn_attention_short_backward, 128, 51, 1),  # 6528 rows tile unpadded
        (attention.cudnn_attention_short_backward, 64, 51, 8),  # 3264 do not; 64 x 56 do
        (attention.cudnn_attention_forward, 48, 196, 8),  # the target encoder's, batch 48
        (attention.cudnn_attention_forward, 13, 196, 1),  # neither tiles: XLA, no padding
        (attention.cudnn_attention_short_backward, 16, 130, 8),  # long: cuDNN pads inside
        (attention.cudnn_attention, 128, 51, 8),  # trains with cuDNN: always padded
        (attention.xla_attention, 64, 51, 1),  # XLA's attention takes any length
    ],
)
def test_the_kernel_input_is_padded_where_attention_or_tiling_needs_it(fn, batch, tokens, multiple):
    """cuDNN's calls that take any length leave tokens unpadded unless only padding to 8 lets
    the q/k/v kernel tile batch x tokens rows (as it did when every length was padded)."""
    attn = vit.Attention(256, 4, fn, dtype=jnp.bfloat16, fused_qkv=True, rngs=nnx.Rngs(0))
    assert attn._kernel_multiple(batch, tokens) == multiple


@pytest.mark.gpu
@needs_the_kernel
@pytest.mark.parametrize("k,n_out", [(256, 256), (384, 384), (768, 768), (1280, 1280), (256, 192)])
def test_kernel_matches_a_float32_reference(k, n_out):
    """Ring depths 2, 3, 6 and 5, and 64-wide column tiles (n_out 192). At 67 x 6 tiles over
    the 132 SMs of an H100 or H200, 3 or 4 per CTA: both warpgroups take turns, and warpgroup 1
    sits out the last turn on some CTAs."""
    m, n = 67 * 128, 3 * n_out
    assert dense.tiling_for(m, k, n_out) is not None  # else this would test nothing
    for _ in range(2):  # fresh inputs again: a tile left unwritten would keep the old values
        kx, kw, kb = jax.random.split(fresh_key(), 3)
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        w = (jax.random.normal(kw, (k, n)) * k**-0.5).astype(jnp.bfloat16)
        b = jax.random.normal(kb, (n,)) * 0.5
        got = dense.dense_split(x, w, b, splits=3)
        x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
        pre = jnp.dot(x32, w32, precision="highest") + b.astype(jnp.bfloat16).astype(jnp.float32)
        want = jnp.split(pre, 3, axis=1)
        assert len(got) == len(want)
        for g, r in zip(got, want, strict=True):
            assert g.dtype == jnp.bfloat16 and g.shape == r.shape
            assert rel_err(g, r) < 1e-2


@pytest.mark.gpu
@needs_the_kernel
def test_fused_qkv_matches_the_plain_layer_on_gpu():
    key = fresh_key()
    linear, x = _layer_and_input(key, 256, 768, rows=512)
    assert dense.tiling_for(512, 256, 256) is not None  # the kernel, not XLA, runs
    got, got_grads = _values_and_grads(_qkv(True), linear, x, key)
    want, want_grads = _values_and_grads(_qkv(False), linear, x, key)
    for g, w in zip([*got, *got_grads], [*want, *want_grads], strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < 2e-2


@pytest.mark.gpu
@needs_the_kernel
def test_the_q_k_v_gradients_reach_the_projection_without_a_concatenation():
    """The short backward writes dq, dk and dv side by side in the layout of the kernel's
    [rows, 3 * dim] output, so the projection's backward reads them without a concatenating
    copy (0.7-2% of a step on an H200, BENCHMARKS.md)."""
    batch, tokens, dim = 16, 72, 256  # a context-like sequence: cuDNN pads nothing, rows tile
    attn = vit.Attention(
        dim,
        4,
        attention.cudnn_attention_short_backward,
        dtype=jnp.bfloat16,
        fused_qkv=True,
        rngs=nnx.Rngs(0),
    )
    assert attn.fused_qkv and dense.tiling_for(batch * tokens, dim, dim) is not None
    graphdef, params = nnx.split(attn)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) ** 2)

    x = jax.random.normal(fresh_key(), (batch, tokens, dim))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    assert "short_attention_backward" in hlo  # the kernel, not cuDNN's backward, ran
    packed = f"bf16[{batch * tokens},{3 * dim}]"
    concatenations = [line for line in hlo.splitlines() if f"{packed}{{1,0}} concatenate(" in line]
    assert not concatenations, concatenations
