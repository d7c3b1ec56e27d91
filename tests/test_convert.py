"""jepa_jax.convert against the official I-JEPA architecture, written below in PyTorch from
IJEPA_REFERENCE.md (the release's module names, registration order and forward): float32 parity
of both encoders and the predictor, round trips both ways, the release's own loading path, and
the errors. Tiny models (ViT-tiny, a 2-block predictor), seeded inputs, one workdir per patch.
"""

import fractions
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from jepa_jax import checkpoint, convert, models, sharding, trainer

torch = pytest.importorskip("torch")
nn = torch.nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, DEPTH, HEADS = 192, 12, 3  # ViT-tiny, the smallest size here
PRED_DIM, PRED_DEPTH, BATCH, TARGETS = 96, 2, 2, 4
# Patch 14 at 224 px as the released ViT-H/14; patch 16 on a smaller grid keeps the test fast.
IMAGE = {14: 224, 16: 128}


# --- the official architecture -----------------------------------------------------------------


def sincos_table(dim: int, grid: int) -> np.ndarray:
    """[grid*grid, dim]: first half encodes the column, second the row; each [sin | cos]."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def half(pos):
        angle = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)

    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return np.concatenate([half(cols), half(rows)], axis=1).astype(np.float32)


def gather(x, masks):
    """The release's apply_masks: for each index set [B, K], gather; stack the sets on batch."""
    return torch.cat([torch.gather(x, 1, m[..., None].expand(-1, -1, x.shape[-1])) for m in masks])


def repeat_per_context(x, batch, repeat):
    """The release's repeat_interleave_batch: each batch-sized chunk repeated `repeat` times."""
    chunks = x.split(batch)
    return torch.cat([c for chunk in chunks for c in [chunk] * repeat])


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Encoder(nn.Module):
    """The release's VisionTransformer: conv patches + fixed positions, gather, blocks, norm."""

    def __init__(self, patch, image, dim=WIDTH, depth=DEPTH, heads=HEADS):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        table = torch.from_numpy(sincos_table(dim, image // patch))[None]
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, masks=None):
        x = self.patch_embed(x) + self.pos_embed
        if masks is not None:
            x = gather(x, masks)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Predictor(nn.Module):
    """The release's VisionTransformerPredictor: context + one mask token per target position,
    the context repeated for each target block (block-major), full attention."""

    def __init__(self, num_patches, dim=WIDTH, pred_dim=PRED_DIM, depth=PRED_DEPTH, heads=HEADS):
        super().__init__()
        self.predictor_embed = nn.Linear(dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        table = torch.from_numpy(sincos_table(pred_dim, int(num_patches**0.5)))[None]
        self.predictor_pos_embed = nn.Parameter(table, requires_grad=False)
        self.predictor_blocks = nn.ModuleList([Block(pred_dim, heads) for _ in range(depth)])
        self.predictor_norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(pred_dim, dim)

    def forward(self, x, masks_x, masks):
        batch = len(x) // len(masks_x)
        pos = self.predictor_pos_embed.repeat(batch, 1, 1)
        x = self.predictor_embed(x) + gather(pos, masks_x)
        n_context = x.shape[1]
        target_pos = repeat_per_context(gather(pos, masks), batch, len(masks_x))
        tokens = self.mask_token.repeat(*target_pos.shape[:2], 1) + target_pos
        x = torch.cat([x.repeat(len(masks), 1, 1), tokens], dim=1)
        for block in self.predictor_blocks:
            x = block(x)
        return self.predictor_proj(self.predictor_norm(x)[:, n_context:])


class DDP(nn.Module):
    """Stands in for DistributedDataParallel: the wrapper that gives every key its `module.`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def release_optimizer(encoder, predictor):
    """The release's AdamW (helper.init_opt): weights, then biases and 1-D params, per network."""
    groups = [
        [p for n, p in m.named_parameters() if "bias" not in n and p.ndim != 1]
        for m in (encoder, predictor)
    ] + [
        [p for n, p in m.named_parameters() if "bias" in n or p.ndim == 1]
        for m in (encoder, predictor)
    ]
    return torch.optim.AdamW(
        [{"params": g} for g in groups[:2]]
        + [{"params": g, "WD_exclude": True, "weight_decay": 0} for g in groups[2:]]
    )


def randomize(module, seed):
    """Every trained parameter random (LayerNorm scales around 1), so each one is checked."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                scale = 1.0 if p.ndim == 1 and "norm" in name and name.endswith("weight") else 0.0
                noise = rng.standard_normal(p.shape, dtype=np.float32)
                p.copy_(torch.from_numpy(scale + 0.05 * noise))


def images(seed, image):
    return torch.randn(BATCH, 3, image, image, generator=torch.Generator().manual_seed(seed))


def index_sets(seed, n_sets, k, grid):
    """n_sets sorted index sets [BATCH, k] over the patch grid."""
    rng = np.random.default_rng(seed)
    sets = [np.sort(rng.permutation(grid)[:k]) for _ in range(n_sets * BATCH)]
    return torch.from_numpy(np.stack(sets).reshape(n_sets, BATCH, k))


def release_dict(encoder, predictor, target, opt) -> dict:
    """The dict the release saves (train.py's save_checkpoint), DDP prefixes included."""
    return {
        "encoder": DDP(encoder).state_dict(),
        "predictor": DDP(predictor).state_dict(),
        "target_encoder": DDP(target).state_dict(),
        "opt": opt.state_dict(),
        "scaler": torch.amp.GradScaler("cpu").state_dict(),
        "epoch": 7,
        "loss": 0.25,
        "batch_size": 128,
        "world_size": 16,
        "lr": 1e-3,
    }


def tiny_config(patch, dtype="float32"):
    config = get_config("tiny")
    config.model.update(
        patch_size=patch,
        image_size=IMAGE[patch],
        pred_depth=PRED_DEPTH,
        pred_dim=PRED_DIM,
        dtype=dtype,
    )
    return config


@pytest.fixture(scope="module", params=[16, 14], ids=["patch16", "patch14"])
def release(request, tmp_path_factory):
    """A release checkpoint of random weights (context != target encoder; one AdamW step taken,
    so `opt` holds moments) and its conversion into a float32 workdir."""
    torch.set_num_threads(1)  # small ops on 2 shared cores: threads only add overhead
    patch = request.param
    image = IMAGE[patch]
    grid = (image // patch) ** 2
    encoder, target, predictor = Encoder(patch, image), Encoder(patch, image), Predictor(grid)
    randomize(encoder, 1), randomize(target, 2), randomize(predictor, 3)
    opt = release_optimizer(encoder, predictor)
    for p in [*encoder.parameters(), *predictor.parameters()]:
        p.grad = p.detach().flip(0) if p.requires_grad else None  # any values; no forward needed
    opt.step()
    opt.zero_grad()
    root = tmp_path_factory.mktemp(f"release{patch}")
    path = str(root / "ijepa.pth.tar")
    torch.save(release_dict(encoder, predictor, target, opt), path)
    config = tiny_config(patch)
    convert.to_workdir(path, str(root / "workdir"), config=config)
    return SimpleNamespace(
        patch=patch,
        image=image,
        grid=grid,
        encoder=encoder.eval(),
        target=target.eval(),
        predictor=predictor.eval(),
        opt=opt,
        path=path,
        workdir=str(root / "workdir"),
        config=config,
        root=root,
    )


# Tests of the mapping, the files and the command, not of the model: one patch size is enough.
ONE_PATCH = pytest.mark.parametrize("release", [16], ids=["patch16"], indirect=True)


def rel_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def nhwc(x):
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


# Shared: nnx.jit caches on the graph, so both encoders of a workdir compile once per input shape.
run_encoder = nnx.jit(lambda encoder, x, idx: encoder(x, idx))
run_predictor = nnx.jit(lambda predictor, *args: predictor(*args))


@pytest.fixture
def exact_float32():
    """float32 matmuls in full precision on every backend (GPUs default to TF32 for them)."""
    with jax.default_matmul_precision("highest"):
        yield


# --- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["target", "context"])
def test_encoders_match_the_release(release, which, exact_float32):
    encoder, _ = models.load_encoder(release.workdir, which=which, attention="reference")
    reference = release.target if which == "target" else release.encoder
    x = images(10, release.image)
    context = index_sets(11, 1, release.grid // 4, release.grid)[0]
    with torch.no_grad():
        full, part = reference(x), reference(x, [context])
    ours_full = run_encoder(encoder, nhwc(x), None)
    ours_part = run_encoder(encoder, nhwc(x), jnp.asarray(context.numpy()))
    assert rel_error(ours_full, full) < 1e-5
    assert rel_error(ours_part, part) < 1e-5
    # The two encoders differ, so loading the wrong one could not pass the checks above.
    other = release.encoder if which == "target" else release.target
    with torch.no_grad():
        assert rel_error(ours_full, other(x)) > 0.1


def test_predictor_matches_the_release(release, exact_float32):
    config, state, _ = convert.read_workdir(release.workdir)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.from_config(config.model).predictor))
    predictor, grid = nnx.merge(graphdef, state.params["predictor"]), release.grid
    k = 12
    with torch.no_grad():
        context_idx = index_sets(20, 1, grid // 4, grid)[0]
        z = release.encoder(images(21, release.image), [context_idx])
        # Four equal blocks, batched as the release does: output [M*B, K, D], block-major.
        blocks = index_sets(22, TARGETS, k, grid)
        expected = release.predictor(z, [context_idx], list(blocks))
        expected = expected.reshape(TARGETS, BATCH, k, WIDTH).transpose(0, 1)
        # Blocks of different sizes: one release call each; here they are padded to one length.
        sizes = [12, 7, 10, 4]
        ragged = [
            release.predictor(z, [context_idx], [blocks[m, :, :n]]) for m, n in enumerate(sizes)
        ]
    args = (jnp.asarray(z.numpy()), jnp.asarray(context_idx.numpy()))
    target_idx = jnp.asarray(blocks.numpy().transpose(1, 0, 2))  # [B, M, K]
    out = run_predictor(predictor, *args, target_idx, jnp.full((BATCH, TARGETS), k))
    assert rel_error(out, expected) < 1e-5
    out = run_predictor(predictor, *args, target_idx, jnp.asarray([sizes] * BATCH))
    for m, n in enumerate(sizes):
        assert rel_error(out[:, m, :n], ragged[m]) < 1e-5


# --- round trips, and the release's own loading path ---------------------------------------------


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical(a, b, where=""):
    """Same keys, same values; tensors equal bit for bit with the same dtype and shape."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


def load_like_the_release(ckpt, patch, image):
    """The release's load_checkpoint: strict loads into DDP-wrapped networks, then AdamW and the
    bf16 GradScaler. Returns the networks and the optimizer."""
    grid = (image // patch) ** 2
    encoder, target, predictor = Encoder(patch, image), Encoder(patch, image), Predictor(grid)
    for module, key in ((encoder, "encoder"), (predictor, "predictor"), (target, "target_encoder")):
        DDP(module).load_state_dict(ckpt[key], strict=True)
    opt = release_optimizer(encoder, predictor)
    opt.load_state_dict(ckpt["opt"])
    torch.amp.GradScaler("cpu").load_state_dict(ckpt["scaler"])
    return encoder, predictor, target, opt


def test_release_to_ours_to_release_is_identical(release):
    out = str(release.root / "back.pth.tar")
    said = []
    convert.to_release(release.workdir, out, say=said.append)
    assert len(said) == 1 and said[0].startswith("Wrote")  # no GELU note: the exact GELU ran
    original, back = load(release.path), load(out)
    assert_identical(back, original)
    encoder, _, _, opt = load_like_the_release(back, release.patch, release.image)
    for (name, p), q in zip(encoder.named_parameters(), release.encoder.parameters(), strict=True):
        assert torch.equal(p, q), name
        if q in release.opt.state:  # AdamW's moments land on the same parameters
            assert torch.equal(opt.state[p]["exp_avg_sq"], release.opt.state[q]["exp_avg_sq"])


@ONE_PATCH
def test_ours_to_release_to_ours_is_identical(release, tmp_path):
    """A workdir of this project (no release metadata beside it) -> .pth.tar -> workdir."""
    ours = tmp_path / "ours"
    shutil.copytree(release.workdir, ours)
    os.remove(ours / convert.SIDECAR)
    path = str(tmp_path / "ours.pth.tar")
    convert.to_release(str(ours / "checkpoints" / "0"), path)  # a step folder works too
    load_like_the_release(load(path), release.patch, release.image)
    convert.to_workdir(path, str(tmp_path / "again"))
    _, before, _ = convert.read_workdir(str(ours))
    _, after, _ = convert.read_workdir(str(tmp_path / "again"))
    for (where, a), b in zip(
        jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after), strict=True
    ):
        assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(where)


# --- continuing training -----------------------------------------------------------------------


@ONE_PATCH
def test_training_resumes_from_a_converted_workdir(release, tmp_path):
    """What train.py does on start: the checkpoint is accepted with any data.num_workers, and
    the restored state is the converted one."""
    config = tiny_config(16)
    config.data.num_workers = 3  # batches depend on the step alone: any worker count resumes
    _, target = trainer.abstract_state(config, sharding.make_mesh(config.mesh))
    ckpt = checkpoint.Checkpointer(release.workdir, config)
    assert ckpt.latest_step == 0
    state, counters = ckpt.restore(target, {"bad_images": 0})
    assert counters == {"bad_images": 0}
    ckpt.close()
    kernel = state.params["encoder"]["blocks"]["layers"]["attn"]["qkv"]["kernel"]
    expected = release.encoder.blocks[3].attn.qkv.weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(kernel[3]), expected)
    adam = [x for x in jax.tree.leaves(state.opt_state, is_leaf=convert.write_workdir.is_adam)]
    assert int(next(x for x in adam if convert.write_workdir.is_adam(x)).count) == 1

    with pytest.raises(ValueError, match=r"config.model.image_size=96 but the checkpoint has 128"):
        checkpoint.Checkpointer(release.workdir, get_config("tiny")).close()


@ONE_PATCH
def test_a_shallower_encoder_converts_with_its_depth(release, tmp_path):
    """A size is its width and MLP; a release with fewer blocks (here 11 of tiny's 12) becomes a
    workdir with config.model.depth=11, and converts back to the same tensors."""
    path = release_variant(release, tmp_path, drop_last_block)
    convert.to_workdir(path, str(tmp_path / "workdir"), config=None)
    encoder, config = models.load_encoder(str(tmp_path / "workdir"), attention="reference")
    assert (config.model.variant, config.model.depth, encoder.blocks.depth) == ("tiny", 11, 11)
    convert.to_release(str(tmp_path / "workdir"), str(tmp_path / "back.pth.tar"))
    before, after = load(path), load(str(tmp_path / "back.pth.tar"))
    for net in ("encoder", "target_encoder", "predictor"):
        assert_identical(after[net], before[net], net)


@ONE_PATCH
def test_a_tanh_gelu_run_converts_and_says_the_release_computes_the_exact_gelu(release, tmp_path):
    config = tiny_config(16)
    config.model.gelu = "tanh"
    convert.to_workdir(release.path, str(tmp_path / "workdir"), config=config)
    said = []
    convert.to_release(str(tmp_path / "workdir"), str(tmp_path / "back.pth.tar"), say=said.append)
    assert_identical(load(str(tmp_path / "back.pth.tar")), load(release.path))
    assert len(said) == 2 and "config.model.gelu=tanh" in said[1] and "exact GELU" in said[1]


# --- errors ------------------------------------------------------------------------------------


def release_variant(release, tmp_path, edit) -> str:
    """The fixture's checkpoint with `edit(ckpt)` applied, saved as the release saves."""
    ckpt = load(release.path)
    edit(ckpt)
    path = str(tmp_path / "edited.pth.tar")
    torch.save(ckpt, path)
    return path


def assert_refused(path, out, match, config=None):
    with pytest.raises(convert.ConvertError, match=match):
        convert.to_workdir(path, str(out), config=config)
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(os.path.dirname(out)) if ".tmp-" in n]


def drop_last_block(ckpt):
    for key in ("encoder", "target_encoder"):
        ckpt[key] = {k: v for k, v in ckpt[key].items() if ".blocks.11." not in k}


def narrow_the_mlp(ckpt):
    for key in ("encoder", "target_encoder"):
        for name in ("fc1.weight", "fc1.bias"):
            tensors = ckpt[key]
            tensors[f"module.blocks.0.mlp.{name}"] = tensors[f"module.blocks.0.mlp.{name}"][:767]


def widen_one_bias(ckpt):
    ckpt["predictor"]["module.predictor_blocks.1.mlp.fc2.bias"] = torch.zeros(97)


def shift_positions(ckpt):
    ckpt["target_encoder"]["module.pos_embed"] += 0.1


@ONE_PATCH
def test_weights_that_match_no_model_are_refused(release, tmp_path):
    out = tmp_path / "out"
    path = release_variant(release, tmp_path, narrow_the_mlp)
    assert_refused(path, out, r"encoder \(width 192, MLP 767, 12 blocks\) matches no model size")
    path = release_variant(release, tmp_path, widen_one_bias)
    assert_refused(
        path, out, r"predictor.predictor_blocks.1.mlp.fc2.bias is \(97,\), expected \(96,\)"
    )
    path = release_variant(release, tmp_path, shift_positions)
    assert_refused(path, out, "target_encoder.pos_embed is not the fixed 2-D sin-cos table")
    config = tiny_config(16)
    config.model.update(image_size=96, pred_depth=6)
    assert_refused(
        release.path,
        out,
        r"config.model.image_size=96 but the checkpoint has 128; "
        r"config.model.pred_depth=6 but the checkpoint has 2",
        config=config,
    )


@ONE_PATCH
def test_files_that_are_not_plain_checkpoints_are_refused(release, tmp_path):
    out = tmp_path / "out"
    text = tmp_path / "notes.pth.tar"
    text.write_text("not a checkpoint\n")
    assert_refused(str(text), out, "is not a PyTorch checkpoint")
    data = open(release.path, "rb").read()
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(data[: len(data) // 2])
    assert_refused(str(cut), out, "is cut short")
    unsafe = tmp_path / "unsafe.pth.tar"  # a class instance: unpickling it would call code
    torch.save({"encoder": fractions.Fraction(1, 3)}, unsafe)
    assert_refused(str(unsafe), out, "was refused: besides tensors and plain containers")
    other = tmp_path / "other.pth.tar"
    torch.save({"model": {"w": torch.zeros(2)}}, other)
    assert_refused(str(other), out, "is not an I-JEPA training checkpoint")
    assert_refused(str(tmp_path / "missing.pth.tar"), out, "no such file")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    with pytest.raises(convert.ConvertError, match="already exists"):
        convert.to_workdir(release.path, str(busy))


@ONE_PATCH
def test_an_interrupted_write_leaves_nothing(release, tmp_path, monkeypatch):

    def fail(workdir, state, config):
        os.makedirs(os.path.join(workdir, "checkpoints", "0"))
        raise OSError("disk full")

    monkeypatch.setattr(convert.write_workdir, "_save_workdir", fail)
    with pytest.raises(OSError, match="disk full"):
        convert.to_workdir(release.path, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


# --- the command line --------------------------------------------------------------------------


@ONE_PATCH
def test_command_line(release, tmp_path, capsys, monkeypatch):
    """Without --config the preset is picked from the shapes; a checkpoint without AdamW state
    says so; usage and error lines; no torch installed gives the install command."""
    path = release_variant(release, tmp_path, lambda c: c.update(opt={}))
    out = str(tmp_path / "converted")
    assert convert.main(["convert", "--checkpoint", path, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "Found: ViT-tiny/16 encoder (width 192, 12 blocks, 3 heads) at 128 px" in printed
    assert "the checkpoint holds no AdamW state: AdamW starts fresh" in printed
    assert "config: preset tiny with the checkpoint's model fields" in printed
    _, state, _ = convert.read_workdir(out)
    adam = next(
        x
        for x in jax.tree.leaves(state.opt_state, is_leaf=convert.write_workdir.is_adam)
        if convert.write_workdir.is_adam(x)
    )
    assert int(adam.count) == 0 and not any(np.any(x) for x in jax.tree.leaves(adam.mu))

    assert convert.main(["convert", "--help"]) == 0
    assert "--checkpoint: A release .pth.tar" in capsys.readouterr().out
    assert convert.main(["convert", "--workdir", out]) == 2
    assert "give --out and exactly one of" in capsys.readouterr().err
    assert convert.main(["convert", "--workdir", str(tmp_path / "nope"), "--out", "x.pth"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("convert: error: no checkpoint at") and "\n" not in err

    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    assert convert.main(["convert", "--checkpoint", path, "--out", str(tmp_path / "b")]) == 1
    assert 'pip install -e ".[torch]"' in capsys.readouterr().err


def test_importing_the_package_does_not_import_torch():
    code = (
        "import sys, jepa_jax, jepa_jax.convert, jepa_jax.checkpoint; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


# --- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_converted_weights_run_with_every_attention(release, tmp_path):
    """bf16 compute: cudnn, xla and reference attention agree with each other and with the
    float32 release model within bf16 tolerance, on full images and on context subsets."""
    workdir = str(tmp_path / "bf16")
    convert.to_workdir(release.path, workdir, config=tiny_config(release.patch, "bfloat16"))
    x = images(30, release.image)
    context = index_sets(31, 1, release.grid // 4 + 1, release.grid)[0]  # an odd length
    with torch.no_grad():
        expected = [release.target(x), release.target(x, [context])]
    results = {}
    for impl in ("cudnn", "xla", "reference"):
        encoder, _ = models.load_encoder(workdir, which="target", attention=impl)
        results[impl] = [
            run_encoder(encoder, nhwc(x), None),
            run_encoder(encoder, nhwc(x), jnp.asarray(context.numpy())),
        ]
    for impl, outputs in results.items():
        for what, ours, reference, ours_ref in zip(
            ("full", "context"), outputs, expected, results["reference"], strict=True
        ):
            to_release, to_reference = rel_error(ours, reference), rel_error(ours, ours_ref)
            print(
                f"{impl} {what}: vs the release {to_release:.2e}, vs reference {to_reference:.2e}"
            )
            assert to_release < 2e-2 and to_reference < 1e-2, impl
