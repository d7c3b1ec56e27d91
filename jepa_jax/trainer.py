"""I-JEPA training: the state, the pure step, and the loop that feeds it and logs."""

from __future__ import annotations

import contextlib
import functools
import signal
import threading

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jepa_jax import checkpoint, data, evaluate, kernels, models, objective, optim, sharding
from jepa_jax import totals as totals_lib
from jepa_jax.configuration import validate
from jepa_jax.metrics import MetricsWriter
from jepa_jax.models import fp8
from jepa_jax.objective import Networks


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict  # {"encoder": ..., "predictor": ...}, float32, trained
    target: dict  # EMA copy of params["encoder"], never differentiated
    opt_state: optax.OptState


def train_step(state: TrainState, batch, *, net: Networks, tx, sched: optim.Schedules):
    """One I-JEPA step: predict EMA targets, AdamW on the online nets, EMA the target encoder.

    A step whose loss or gradient norm is not finite changes nothing but the step counter (its
    batch is consumed; parameters, AdamW state and EMA stay) and says so in its metrics; the
    loop decides whether the run goes on (config.on_nan).
    """
    images = data.normalize(batch["images"])  # once, on device: both encoders read it
    targets = objective.target_features(net, state.target, images, batch["target_idx"])
    targets = jax.lax.stop_gradient(targets)
    loss, grads = jax.value_and_grad(objective.prediction_loss)(
        state.params, net, images, batch, targets
    )
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    momentum = sched.momentum(state.step)
    target = optim.ema_update(state.target, params["encoder"], momentum)
    nonfinite = (~jnp.isfinite(loss)).astype(jnp.int32) + 2 * (~jnp.isfinite(grad_norm))
    # The select fuses into the update's own elementwise loops: no extra pass over the state.
    keep = functools.partial(jnp.where, nonfinite == 0)
    params, target, opt_state = jax.tree.map(
        keep, (params, target, opt_state), (state.params, state.target, state.opt_state)
    )
    metrics = {
        "loss": loss,
        "lr": sched.lr(state.step),
        "wd": sched.wd(state.step),
        "momentum": momentum,
        "grad_norm": grad_norm,
        "bad_images": batch["bad_images"].sum(),  # substituted undecodable images, global batch
        "nonfinite": nonfinite,  # 0 finite; bit 1: loss, bit 2: gradient norm not finite
    }
    new_state = state.replace(
        step=state.step + 1, params=params, target=target, opt_state=opt_state
    )
    return new_state, metrics


def build(config, mesh) -> tuple[Networks, TrainState, optax.GradientTransformation]:
    """Resolve attention, then create the state directly sharded over the mesh."""
    m = config.model
    size = models.encoder_size(m)
    choice = models.resolve_attention(
        size,
        m.pred_dim,
        m.attention,
        m.dtype,
        short_backward=kernels.setting(m, "short_attention_backward"),
    )
    fused = models.resolve_fused_qkv(size, m.pred_dim, kernels.setting(m, "fused_qkv"), m.dtype)
    gelu_choice = models.resolve_gelu(m)

    def create_networks():
        ijepa = models.from_config(
            m, seed=config.seed, attention=choice, fused_qkv=fused, gelu_kernel=gelu_choice
        )
        return ijepa.encoder, ijepa.predictor

    def init_params():
        encoder, predictor = create_networks()
        return {
            "encoder": nnx.to_pure_dict(nnx.state(encoder)),
            "predictor": nnx.to_pure_dict(nnx.state(predictor)),
        }

    # Structure from an abstract trace: no parameter memory until the sharded init below.
    encoder, predictor = nnx.eval_shape(create_networks)
    tx = optim.optimizer(config, jax.eval_shape(init_params))

    def init_state():
        params = init_params()
        target = jax.tree.map(jnp.copy, params["encoder"])
        return TrainState(jnp.zeros((), jnp.int32), params, target, tx.init(params))

    shardings = sharding.state_shardings(mesh, jax.eval_shape(init_state))
    state = jax.jit(init_state, out_shardings=shardings)()
    counts = models.layer_counts(encoder, predictor)
    target = models.for_targets(encoder, fp8.setting(m))
    graphdefs = (nnx.graphdef(encoder), nnx.graphdef(target), nnx.graphdef(predictor))
    net = Networks(*graphdefs, choice, counts, fused, gelu_choice)
    return net, state, tx


def abstract_state(config, mesh) -> tuple[Networks, TrainState]:
    """The networks and the state's abstract arrays laid out on `mesh` (nothing allocated):
    the target a checkpoint restores onto."""
    box = {}

    def make():
        box["net"], state, _ = build(config, mesh)
        return state

    target = checkpoint.restore_target(jax.eval_shape(make), mesh)
    return box["net"], target


def compile_step(config, net: Networks, tx, mesh, state: TrainState):
    """The step, jitted once with state/batch shardings and the old state's buffers donated."""
    # Traced on the mesh: cuDNN attention and FSDP's gathers lay their arrays out over it.
    on_mesh = sharding.traced_on(mesh, train_step)
    step = functools.partial(on_mesh, net=net, tx=tx, sched=optim.schedules(config))
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(
        step,
        in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=fp8.compiler_options(config.model) or None,
    )


class StopSignals:
    """Turns SIGTERM/SIGINT into a flag checked after each step; a second SIGINT stops at once.

    Only installed in a single-process run on the main thread: with several processes, JAX's
    preemption service catches SIGTERM and `Checkpointer.reached_preemption` agrees on a step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train_and_evaluate(config, workdir: str, devices=None) -> TrainState:
    """Pretrain for config.total_steps, resuming from WORKDIR/checkpoints if there is one.

    Metrics every config.log_every steps; checkpoints every config.checkpoint_every steps, at the
    end, and on SIGTERM/SIGINT (finish the step, save, return). `devices`: the mesh's devices
    (default: all of them). Returns the state.
    """
    validate(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    if config.batch_size % mesh.size:
        raise ValueError(
            f"config.batch_size={config.batch_size} does not divide over {mesh.size} devices; "
            f"use a multiple of {mesh.size}"
        )
    # Each resource is released however the run ends, even if a later one fails to open.
    with contextlib.ExitStack() as cleanup:
        ckpt = checkpoint.Checkpointer(workdir, config)  # raises now if it cannot resume
        cleanup.callback(ckpt.close)  # waits until pending saves are finalised
        first = ckpt.latest_step or 0
        # The data next, so a wrong path stops the run before anything is built or compiled.
        batches = data.create_iterator(
            config,
            first_step=first,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        cleanup.callback(batches.close)  # stops grain's worker processes
        on_device = sharding.device_batches(mesh, batches)
        evaluator = evaluate.periodic(config, mesh)  # k-NN every config.eval.every steps, or None
        evaluated: dict[str, float] = {}  # logged with the next metrics line
        net, state, tx = build(config, mesh)
        writer = MetricsWriter(workdir, config, first_step=first)
        cleanup.callback(writer.close)  # the progress bar, TensorBoard and W&B
        writer.startup(mesh, net, state)  # devices, data, parameters, attention, where things go
        saved_totals = None
        if ckpt.latest_step is not None:
            target = checkpoint.restore_target(state, mesh)
            state = None  # free the fresh init before reading: peak memory stays one state
            state, saved_totals = ckpt.restore(target, {k: 0 for k in totals_lib.SAVED})
            if jax.process_index() == 0:
                print(f"Resumed from step {ckpt.latest_step} ({ckpt.path()})", flush=True)
        writer.truncate(first)  # rows past the checkpoint are re-logged by this run
        step_fn = compile_step(config, net, tx, mesh, state)
        totals = totals_lib.RunTotals(config, saved_totals)

        def last_checkpoint() -> str | None:
            return ckpt.path(ckpt.last_saved) if ckpt.last_saved is not None else None

        stopped, done = None, first
        with StopSignals() as stop:
            for step in range(first, config.total_steps):
                state, metrics = step_fn(state, next(on_device))
                done = step + 1
                totals.add(metrics, done)
                writer.tick(done, metrics)  # progress bar; times the compiling first step apart
                if evaluator and done % config.eval.every == 0:
                    evaluated = evaluator(net.encoder, state.target)
                if done % config.log_every == 0 or done == config.total_steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    del metrics["bad_images"], metrics["nonfinite"]  # the totals say more
                    metrics.update(totals.read(), **evaluated)
                    evaluated = {}
                    writer.write(done, metrics)  # adds img/s and the ETA
                    totals.check(last_checkpoint())
                stopped = stop.received or ckpt.reached_preemption(done) and "preemption"
                if stopped or ckpt.due(done):
                    totals.check(last_checkpoint())  # never save after a stopping streak
                    ckpt.save(done, state, totals.read())
                if stopped:
                    break
    writer.finish(done, last_checkpoint(), stopped)  # steps, time, loss, checkpoint, next
    return state
