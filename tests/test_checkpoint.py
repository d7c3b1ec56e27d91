"""Checkpoints: exact resume after preemption or a hard kill, other meshes, load_encoder, errors.

Every train.py run shares the session's compilation cache (conftest), so only the first compiles.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from jepa_jax import checkpoint, data, models, sharding, trainer

STEPS, EVERY, KEEP = 8, 2, 2  # test_faults.py's schedule too
# Runs where the mesh is not the point take one device: on 2 CPU cores a step over 8 virtual
# devices costs 3-4x one over 1.
ONE = jax.devices()[:1]


def tiny_config(**mesh):
    config = get_config("tiny")
    config.total_steps, config.checkpoint_every, config.keep_checkpoints = STEPS, EVERY, KEEP
    config.log_every = 1
    config.model.depth = config.model.pred_depth = 1  # resuming is tested, not the model
    config.mesh.update(mesh)
    return config


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def networks_and_target(config, mesh):
    """The training Networks and the state's abstract arrays on `mesh`, without allocating."""
    return trainer.abstract_state(config, mesh)


def read_state(workdir, config, mesh):
    _, target = networks_and_target(config, mesh)
    return checkpoint.Checkpointer(workdir, config).restore(target, {})[0]


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)


def copy_checkpoint(reference, workdir, step=STEPS):
    shutil.copytree(
        os.path.join(reference, "checkpoints", str(step)),
        os.path.join(workdir, "checkpoints", str(step)),
    )


def listing(path):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (train.py's own runs, killed and resumed, are in test_faults.py)."""
    workdir = tmp_path_factory.mktemp("reference")
    trainer.train_and_evaluate(tiny_config(), str(workdir), devices=ONE)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["6", "8"]  # keep_checkpoints=2
    return str(workdir)


@pytest.fixture(scope="module")
def reference_state(reference):
    config = tiny_config()
    return read_state(reference, config, sharding.make_mesh(config.mesh, ONE))


def test_restore_on_all_devices(reference, reference_state):
    config = tiny_config(data=-1, fsdp=2)
    state = read_state(reference, config, sharding.make_mesh(config.mesh))
    assert {d for x in jax.tree.leaves(state) for d in x.devices()} == set(jax.devices())
    assert_trees_equal(state, reference_state)


@pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (the CPU run provides 8 virtual ones)"
)
def test_resume_mid_run_on_other_mesh_and_attention(tmp_path, reference, reference_state):
    """Resume the checkpoint two steps before the end on a (2, 4) mesh with xla attention and
    take the last 2 steps: the run ends where the uninterrupted one did, up to rounding. (Other
    worker counts resume exactly too: test_data's worker test.)"""
    copy_checkpoint(reference, tmp_path, step=STEPS - EVERY)
    config = tiny_config(data=2, fsdp=4)
    config.model.attention = "xla"  # saved under auto (reference on CPU): weights do not care
    state = trainer.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == STEPS
    kernel = state.params["encoder"]["blocks"]["layers"]["fc1"]["kernel"]
    assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 4}
    assert "fsdp" in kernel.sharding.spec
    # Not bit-exact: another mesh sums gradients in another order. The attention keys' biases
    # get a zero true gradient (softmax ignores them), so AdamW steps them by up to the learning
    # rate on the sign of that rounding noise; 2 steps move any parameter by at most 2 * lr.
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=2 * config.optim.lr),
        state.params,
        reference_state.params,
    )
    metrics, expected = read_metrics(tmp_path), read_metrics(reference)
    assert [m["step"] for m in metrics] == [STEPS - 1, STEPS]
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in expected[-2:]], 1e-3)


def test_checkpoint_from_before_the_global_batch_stream_resumes(
    tmp_path, reference, reference_state
):
    """A checkpoint in the earlier layout (a grain data position, no counters, a config without
    the fields added since) resumes and ends where the uninterrupted run did: single-process
    batches are the same function of the step as before."""
    copy_checkpoint(reference, tmp_path, step=STEPS - EVERY)
    step_dir = tmp_path / "checkpoints" / str(STEPS - EVERY)
    shutil.rmtree(step_dir / "counters")
    (step_dir / "data").mkdir()
    (step_dir / "data" / "process_0-of-1.json").write_text('{"next_index": 4}')
    meta = step_dir / "config" / "metadata"
    saved = json.loads(meta.read_text())
    del saved["model"]["residual_dtype"], saved["model"]["fused_qkv"], saved["mask"]["trim_batch"]
    del saved["data"]["on_bad_image"]
    meta.write_text(json.dumps(saved))
    state = trainer.train_and_evaluate(tiny_config(), str(tmp_path), devices=ONE)
    assert int(state.step) == STEPS
    assert_trees_equal(state, reference_state)


def test_load_encoder_matches_training_encoder(reference, reference_state, capsys):
    config = tiny_config()
    net, _ = networks_and_target(config, sharding.make_mesh(config.mesh, ONE))
    images = next(data.create_iterator(config))["images"][:2]
    x = data.normalize(jax.device_put(images, jax.devices()[0]))
    step_dir = os.path.join(reference, "checkpoints", str(STEPS))
    for which, path, params in [
        ("target", reference, reference_state.target),
        ("context", step_dir, reference_state.params["encoder"]),
    ]:
        encoder, loaded_config = models.load_encoder(path, which)
        assert loaded_config.model.to_dict() == config.model.to_dict()
        # The trainer's own encoder (net.encoder as in target_features), on the same device.
        params = jax.device_put(params, jax.devices()[0])
        expected = nnx.merge(net.encoder, params)(x)
        got = encoder(x)
        assert got.shape == (2, (96 // 16) ** 2, 192) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32))
    out = capsys.readouterr().out
    loaded = "Loaded the target (EMA) encoder (tiny, patch 16, 96px, attention reference)"
    assert f"{loaded} from {step_dir}" in out
    assert "Loaded the context encoder" in out


def test_a_run_saved_with_the_kernels_on_loads_where_they_cannot_run(tmp_path, reference):
    """fused_qkv=on and gelu_kernel=on were saved by a GPU run; the kernels never change
    parameters, so load_encoder chooses again here (`auto`: XLA on this CPU) instead of
    refusing."""
    copy_checkpoint(reference, tmp_path)
    meta = tmp_path / "checkpoints" / str(STEPS) / "config" / "metadata"
    saved = json.loads(meta.read_text())
    saved["model"]["fused_qkv"] = saved["model"]["gelu_kernel"] = "on"
    meta.write_text(json.dumps(saved))
    encoder, config = models.load_encoder(str(tmp_path))
    assert config.model.fused_qkv == config.model.gelu_kernel == "on"
    features = encoder(jnp.zeros((1, 96, 96, 3)))
    assert features.shape == (1, (96 // 16) ** 2, 192) and np.isfinite(features).all()


def test_incompatible_config_names_the_fields(tmp_path, reference):
    copy_checkpoint(reference, tmp_path)
    before = listing(tmp_path)
    config = tiny_config()
    config.model.variant, config.model.pred_depth, config.model.depth = "small", 3, 6
    config.data.num_workers = 2  # compatible: batches depend on the step alone
    config.model.attention, config.model.dtype = "xla", "float32"  # compatible: not named
    with pytest.raises(ValueError) as e:
        trainer.train_and_evaluate(config, str(tmp_path), devices=ONE)
    message = str(e.value)
    assert "config.model.variant='small' but the checkpoint has 'tiny'" in message
    assert "config.model.pred_depth=3 but the checkpoint has 1" in message
    assert "config.model.depth=6 but the checkpoint has 1" in message
    assert "num_workers" not in message
    assert "attention" not in message and "dtype" not in message
    assert listing(tmp_path) == before


def test_configs_saved_before_depth_existed_resume_with_the_variants_depth():
    saved = get_config("tiny").to_dict()
    del saved["model"]["depth"]
    checkpoint.check_compatible(saved, get_config("tiny"), "ckpt")  # depth -1: the variant's
    deeper = get_config("tiny")
    deeper.model.depth = 4
    with pytest.raises(ValueError, match="config.model.depth=4 but the checkpoint has -1"):
        checkpoint.check_compatible(saved, deeper, "ckpt")


def test_corrupt_or_missing_checkpoint_says_what_to_do(tmp_path, reference):
    copy_checkpoint(reference, tmp_path)
    step_dir = os.path.join(tmp_path, "checkpoints", str(STEPS))
    # (Truncated array files give the same message, but orbax then leaves never-awaited reads
    # whose tracebacks pytest prints at exit.)
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
        f.write("{not json")
    before = listing(tmp_path)
    config = tiny_config()
    mesh = sharding.make_mesh(config.mesh, ONE)
    for load in (
        lambda: read_state(str(tmp_path), config, mesh),
        lambda: models.load_encoder(str(tmp_path)),
    ):
        with pytest.raises(RuntimeError) as e:
            load()
        assert f"cannot read the checkpoint at {step_dir}" in str(e.value)
        assert "delete that step folder" in str(e.value)
    assert listing(tmp_path) == before  # a failed restore deletes nothing

    with open(os.path.join(step_dir, "config", "metadata"), "w") as f:
        f.write("{not json")
    with pytest.raises(RuntimeError, match="cannot read the checkpoint at"):
        checkpoint.Checkpointer(str(tmp_path), config)

    with pytest.raises(FileNotFoundError, match="no checkpoint at .*missing"):
        models.load_encoder(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no finished checkpoint under"):
        models.load_encoder(str(tmp_path / "empty"))
