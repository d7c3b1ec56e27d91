"""The sharded loop: every mesh computes the same step, and FSDP really splits the state."""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs.default import get_config
from jepa_jax import bench, objective, sharding, trainer
from jepa_jax import data as data_lib
from tests.meshes import mesh_of
from tests.numerics import fresh_key, rel_err

needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (the CPU run provides 8 virtual ones)"
)


def float32_tiny():
    # float32 compute: shardings only reorder reductions, so results agree to float32 rounding
    # (bf16 would blur real bugs into its own 1e-2 noise).
    config = get_config("tiny")
    config.model.dtype = "float32"
    config.optim.warmup_steps = 0
    config.model.depth = 2  # stacked blocks, each sharded; twelve would only take longer
    return config


def gathered_rows(hlo_text: str, batch_size: int) -> list[str]:
    """The arrays of batch rows (rank 3 or more, leading dimension a multiple of the batch) that
    a compiled step's collectives produce; the parameters' lead with 1 or the depth."""
    found = []
    for instruction in bench.hlo.parse(hlo_text).computations.values():
        for i in instruction:
            if i.opcode.removesuffix("-start") in ("all-gather", "all-to-all", "all-reduce"):
                for dtype, dims in bench.hlo._arrays(i.shape):
                    sizes = [int(d) for d in dims.split(",") if d]
                    if len(sizes) >= 3 and sizes[0] % batch_size == 0:
                        found.append(f"{i.opcode} {dtype}{sizes}")
    return found


@needs_8_devices
def test_meshes_agree_with_one_device(run_steps):
    config = float32_tiny()
    ref_state, _, ref_hist = run_steps(config, mesh_of(1, 1), 3)
    ref_params = jax.device_get(ref_state.params)
    for data, fsdp in [(1, 8)]:  # (8, 1) is the default mesh; test_multiprocess runs (1, 4)
        state, step_fn, hist = run_steps(config, mesh_of(data, fsdp), 3)
        # FSDP gathers each layer's parameters; the activations stay split over the batch (left
        # to itself, XLA gathered the blocks' inputs whole on every device instead).
        batches = data_lib.create_iterator(config)
        batch = sharding.global_batch(mesh_of(data, fsdp), next(batches))
        batches.close()
        text = step_fn.lower(state, batch).compile().as_text()
        assert "all-gather" in text and not gathered_rows(text, config.batch_size)
        np.testing.assert_allclose(
            [h["loss"] for h in hist], [h["loss"] for h in ref_hist], rtol=1e-5
        )
        # Three Adam steps of lr 1e-3 move params ~3e-3; 1e-5 absolute is a few % of that motion
        # at worst and far below a wrong gradient's effect.
        for a, b in zip(
            jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(ref_params), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(
    jax.default_backend() != "gpu" or jax.device_count() < 2, reason="needs two GPUs"
)
def test_two_gpus_train_like_one_with_the_kernels_on_each(run_steps):
    """The GPU defaults (bf16, cuDNN attention, the three Pallas kernels) on an FSDP mesh of two
    GPUs: each kernel is in the compiled step, and the losses are one GPU's to bf16's rounding."""
    config = get_config("tiny")
    m = config.model
    m.variant, m.depth, m.pred_dim, m.dtype = "small", 2, 384, "bfloat16"  # widths they tile
    config.batch_size = 32  # 16 images a GPU: rows the kernels tile
    _, _, ref_hist = run_steps(config, mesh_of(1, 1), 3)
    mesh = mesh_of(1, 2)
    state, step_fn, hist = run_steps(config, mesh, 3)
    batches = data_lib.create_iterator(config)
    batch = sharding.global_batch(mesh, next(batches))
    batches.close()
    found = bench.hlo.kernels(step_fn.lower(state, batch).compile().as_text())
    groups = {kernel["group"] for kernel in found}
    assert {"Pallas gelu", "Pallas short_attention_backward"} <= groups
    assert "Pallas q/k/v projection (Mosaic GPU)" in groups
    np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in ref_hist], rtol=1e-2)


@needs_8_devices
def test_fp8_targets_on_an_fsdp_mesh_agree_with_one_device():
    """The FP8 target encoder's scales (maxima and parameter bounds over sharded tensors) give
    one device's targets, far closer to them than FP8's are to float32's: FP8 runs on the FSDP
    mesh, with the scales of the whole tensors."""
    config = float32_tiny()
    config.model.fp8 = "target"
    side = config.model.image_size
    images = jax.random.normal(fresh_key(), (8, side, side, 3))
    idx = jnp.arange(16).reshape(1, 1, 16).repeat(8, 0)
    targets = {}
    for shape in [(1, 1), (1, 8)]:
        net, state, _ = trainer.build(config, mesh_of(*shape))
        plain = dataclasses.replace(net, target_encoder=net.encoder)
        for name, networks in [("fp8", net), ("off", plain)]:
            features = jax.jit(functools.partial(objective.target_features, networks))
            targets[shape, name] = features(state.target, images, idx)
    fp8_error = rel_err(targets[(1, 1), "fp8"], targets[(1, 1), "off"])
    assert fp8_error > 5e-3  # 0.9% here: against float32, e4m3's rounding
    # A value that rounds the other way moves by e4m3's step (6%) and moves values after it a
    # little: 5% of FP8's error typical, 14% at worst over 68 inputs, where float32 sharding
    # alone differs by 4e-7. Per-shard scales or no FP8 on the mesh would reach 100%.
    assert rel_err(targets[(1, 8), "fp8"], targets[(1, 1), "fp8"]) < 0.4 * fp8_error
    assert rel_err(targets[(1, 8), "off"], targets[(1, 1), "off"]) < 1e-5


def test_on_each_device_runs_a_function_on_each_devices_rows():
    """As a Pallas kernel runs on a mesh: each device's rows in, whole weights, nothing
    gathered; the same values and gradients as on one device. Rows that do not divide over
    the devices are run whole."""
    mesh, seen = mesh_of(2, 2), []

    def kernel(x, w):
        seen.append(x.shape)
        return jnp.tanh(x @ w), 2 * x

    keys = jax.random.split(fresh_key(), 4)
    w, x = jax.random.normal(keys[0], (8, 8)), jax.random.normal(keys[1], (16, 8))
    ga, gb = jax.random.normal(keys[2], (16, 8)), jax.random.normal(keys[3], (16, 8))

    def loss(x, w):
        a, b = sharding.on_each_device(kernel, x, w, whole=(1,))
        return jnp.vdot(a, ga) + jnp.vdot(b, gb)

    with jax.set_mesh(mesh):
        on_mesh = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        split = jax.device_put(x, sharding.batch_sharding(mesh))
        got = on_mesh(split, w)
        hlo = on_mesh.lower(split, w).compile().as_text()
        assert seen == [(4, 8)]
        assert sharding.on_each_device(kernel, x[:6], w)[0].shape == (6, 8) and seen[-1] == (6, 8)
        # Inside a shard_map over the batch axes the rows are the device's already.
        rows = jax.sharding.PartitionSpec(sharding.BATCH_AXES)
        inside = jax.shard_map(
            lambda x: sharding.on_each_device(kernel, x, w, whole=(1,))[0],
            in_specs=rows,
            out_specs=rows,
        )
        assert jax.jit(inside)(split).shape == (16, 8) and seen[-1] == (4, 8)
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    want = jax.value_and_grad(loss, argnums=(0, 1))(x, w)  # no mesh: the whole batch at once
    for g, ref in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(g, ref) < 1e-5


def test_largest_divisible_dimension_is_split():
    spec = sharding._fsdp_spec((12, 384, 1152), 8)
    assert spec == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert sharding._fsdp_spec((7, 9), 8) == jax.sharding.PartitionSpec()
    assert sharding._fsdp_spec((192,), 1) == jax.sharding.PartitionSpec()


@needs_8_devices
@pytest.mark.parametrize(
    "data,fsdp,message",
    [
        (3, 3, "does not fit 8 devices"),
        (-1, -1, "both -1"),
        (-1, 16, "does not fit 8 devices"),
        (0, 8, "does not fit 8 devices"),
    ],
)
def test_bad_mesh_is_a_clear_error(data, fsdp, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(ConfigDict({"data": data, "fsdp": fsdp}))


@needs_8_devices
def test_minus_one_takes_the_remaining_devices():
    assert dict(sharding.make_mesh(ConfigDict({"data": -1, "fsdp": 2})).shape) == {
        "data": 4,
        "fsdp": 2,
    }
    assert dict(sharding.make_mesh(ConfigDict({"data": 2, "fsdp": -1})).shape) == {
        "data": 2,
        "fsdp": 4,
    }


@needs_8_devices
def test_batch_must_divide_over_devices(tmp_path):
    config = get_config("tiny")
    config.batch_size = 12
    with pytest.raises(ValueError, match="config.batch_size=12 does not divide over 8 devices"):
        trainer.train_and_evaluate(config, str(tmp_path))


def test_multiprocess_environment_detection():
    assert not sharding.is_multiprocess_env({})
    assert not sharding.is_multiprocess_env({"SLURM_NTASKS": "1"})
    assert sharding.is_multiprocess_env({"SLURM_NTASKS": "4"})
    assert sharding.is_multiprocess_env({"OMPI_COMM_WORLD_SIZE": "2"})
    assert sharding.is_multiprocess_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})


@needs_8_devices
def test_fsdp8_trains_vit_b16_shaped_model(run_steps):
    """ViT-B width (two of its blocks, smaller images), fsdp=8: trains with no full replica
    anywhere."""
    config = get_config("vit_b16")
    config.model.image_size, config.batch_size, config.data.num_workers = 64, 8, 0
    config.model.depth = 2  # the blocks are stacked: twelve only take longer to step
    config.mask.min_keep = 4
    config.mesh.data, config.mesh.fsdp = 1, 8
    config.model.scan_layers = True  # one compiled block: the sharding is what is tested
    state, _, hist = run_steps(config, sharding.make_mesh(config.mesh), 1)
    assert all(np.isfinite(h["loss"]) for h in hist)
    device = jax.devices()[0]
    total = per_device = 0
    for leaf in jax.tree.leaves(state):
        total += leaf.nbytes
        per_device += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
        if any(d % 8 == 0 for d in leaf.shape):
            assert "fsdp" in leaf.sharding.spec, (leaf.shape, leaf.sharding.spec)
    # params, EMA target and both Adam moments split 8 ways; only scalars replicate
    assert per_device < total / 8 * 1.01


def test_device_batches_are_put_a_step_ahead_and_in_order():
    mesh = mesh_of(jax.device_count(), 1)
    rows = 2 * jax.device_count()
    for ahead in (1, 2, 3):
        taken = []

        def host_batches(taken=taken):
            for i in range(5):
                taken.append(i)
                yield {"x": np.full((rows, 3), i, np.float32)}

        batches = sharding.device_batches(mesh, host_batches(), ahead)
        first = next(batches)
        assert len(taken) == ahead  # those after it are already on their way to the devices
        assert first["x"].sharding == sharding.batch_sharding(mesh)
        assert [float(b["x"][0, 0]) for b in [first, *batches]] == [0, 1, 2, 3, 4]


def test_the_kernels_on_a_mesh_train_like_one_device(monkeypatch, run_steps):
    """The GPU path's three kernels and cuDNN's calls, each stood in for on a CPU (the GELU and
    short-backward kernels interpreted, the q/k/v kernel by its XLA statement, cuDNN's forward
    by the reference), in whole float32 steps: on a mesh of two devices each kernel gets that
    device's rows, and the losses are one device's."""
    from jepa_jax import attention, kernels
    from jepa_jax.kernels import dense, gelu, short_attention
    from jepa_jax.models import layers

    shapes = collections.defaultdict(set)

    def recorded(name, fn, **extra):
        def run(*args, **kwargs):
            shapes[name].add(args[0].shape[0])
            return fn(*args, **kwargs, **extra)

        return run

    cudnn = attention.Choice("auto", "cudnn")
    monkeypatch.setattr(attention, "resolve", lambda name, dtype, head_dims: cudnn)
    monkeypatch.setattr(
        attention, "_cudnn", lambda q, k, v, n: attention.reference_attention(q, k, v, kv_lengths=n)
    )
    for check in ("_gpu_reason", "_gelu_check", "_short_backward_check", "unavailable_reason"):
        monkeypatch.setattr(kernels, check, lambda *_: None)
    monkeypatch.setattr(gelu, "gelu", recorded("gelu", gelu.gelu, interpret=True))
    backward = recorded("backward", short_attention.attention_backward, interpret=True)
    monkeypatch.setattr(short_attention, "attention_backward", backward)
    monkeypatch.setattr(layers, "dense_split", recorded("qkv", dense.reference))
    config = float32_tiny()
    m = config.model
    m.variant, m.depth, m.pred_depth, m.pred_dim = "small", 1, 1, 384  # widths the q/k/v tiles
    config.batch_size = 32
    _, _, ref_hist = run_steps(config, mesh_of(1, 1), 2)
    one_device = {name: set(rows) for name, rows in shapes.items()}
    shapes.clear()
    _, _, hist = run_steps(config, mesh_of(1, 2), 2)
    assert set(shapes) == {"gelu", "backward", "qkv"}
    for name in ("gelu", "backward"):  # each device's half of what one device took
        assert shapes[name] == {rows // 2 for rows in one_device[name]}, name
    # The q/k/v rows too, the target encoder's padded where a device's rows only tile so.
    assert shapes["qkv"] == {128, 640, 768} and one_device["qkv"] == {256, 1152, 1536}
    np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in ref_hist], rtol=1e-5)
