"""Multi-process training for real: 2 and 4 JAX processes on this machine, talking over 127.0.0.1
(a free port), CPU backend with cross-process (gloo) collectives, each with 2 CPU devices, train
`tiny` through train.py's plain flags on a mesh that spans the processes.

They compute what one process with the same device count computes (float32: only the order of
cross-device sums differs), write one checkpoint together, resume it on another process count,
stop together on SIGTERM to one of them, and fail fast when one is SIGKILLed.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs.default import get_config
from jepa_jax import checkpoint, sharding, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8
TIMEOUT_S = 20  # --distributed_timeout: the bound on waiting for a dead process
RUN_TIMEOUT_S = 300  # a hung launch fails the test instead of the suite


def tiny_config(steps: int, data: int, fsdp: int) -> ConfigDict:
    config = get_config("tiny")
    config.total_steps, config.log_every, config.batch_size = steps, 1, BATCH
    # float32 compute: one and several processes differ only in the order of cross-device sums.
    config.model.dtype = "float32"
    # One block each: the processes' agreement is tested, and every launch compiles sooner.
    config.model.depth = config.model.pred_depth = 1
    config.mesh.data, config.mesh.fsdp = data, fsdp
    return config


def overrides(config: ConfigDict) -> list[str]:
    return [
        "--config=configs/default.py:tiny",
        f"--config.total_steps={config.total_steps}",
        f"--config.log_every={config.log_every}",
        f"--config.batch_size={config.batch_size}",
        f"--config.model.dtype={config.model.dtype}",
        f"--config.model.depth={config.model.depth}",
        f"--config.model.pred_depth={config.model.pred_depth}",
        f"--config.mesh.data={config.mesh.data}",
        f"--config.mesh.fsdp={config.mesh.fsdp}",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int) -> dict[str, str]:
    """This session's environment (its compilation cache) with `devices` CPU devices.

    XLA's LLVM optimisation is off in every run here, the references too: it halves the compile
    time, which dominates these few steps (a multi-process CPU run cannot use the cache).
    """
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    flags += f" --xla_force_host_platform_device_count={devices}"
    flags += " --xla_backend_optimization_level=0"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())


class Launch:
    """`processes` train.py processes of one run (one, without distributed flags, if 1)."""

    def __init__(self, logdir, name, workdir, config, processes, devices, timeout_s=TIMEOUT_S):
        port = free_port()
        LAUNCHED.append(self)
        self.logs = [os.path.join(logdir, f"{name}.p{i}.log") for i in range(processes)]
        self.procs = []
        for i, log in enumerate(self.logs):
            cmd = [sys.executable, "train.py", f"--workdir={workdir}", *overrides(config)]
            if processes > 1:
                cmd += [
                    f"--coordinator_address=127.0.0.1:{port}",
                    f"--num_processes={processes}",
                    f"--process_id={i}",
                    f"--distributed_timeout={timeout_s}",
                ]
            with open(log, "w") as f:
                self.procs.append(
                    subprocess.Popen(cmd, cwd=REPO, env=child_env(devices), stdout=f, stderr=f)
                )

    def log(self, i: int) -> str:
        with open(self.logs[i]) as f:
            return f.read()

    def logs_tail(self) -> str:
        return "\n".join(f"--- process {i}\n{self.log(i)[-3000:]}" for i in range(len(self.logs)))

    def wait_for(self, text: str, process: int = 0) -> None:
        deadline = time.time() + RUN_TIMEOUT_S
        while text not in self.log(process):
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                self.kill()
                pytest.fail(f"no {text!r} in process {process}'s log\n{self.logs_tail()}")
            time.sleep(0.05)

    def wait(self) -> list[int]:
        try:
            return [p.wait(timeout=RUN_TIMEOUT_S) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"a process hung\n{self.logs_tail()}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


LAUNCHED: list[Launch] = []


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """A failed test leaves no training process behind (they ignore SIGTERM: it means save)."""
    yield
    while LAUNCHED:
        LAUNCHED.pop().kill()


def run_to_the_end(*args, **kwargs) -> Launch:
    launch = Launch(*args, **kwargs)
    assert launch.wait() == [0] * len(launch.procs), launch.logs_tail()
    return launch


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_state(workdir, config, mesh):
    """The latest checkpoint of `workdir`, read by this (one) process onto `mesh`."""
    shapes = jax.eval_shape(lambda: trainer.build(config, mesh)[1])
    target = checkpoint.restore_target(shapes, mesh)
    return checkpoint.Checkpointer(str(workdir), config).restore(target, {})[0]


def assert_same_run(workdir, reference, config, devices: int) -> None:
    """Losses of every step (each logged once) and the final state equal the reference run's.

    Both are float32 with the same global batch, mesh shape and device count; several processes
    only sum across devices in another order (gloo's all-reduce), which moves a loss by a few
    ulps (measured: at most 2e-7 relative; 1e-5 allowed). Parameters and AdamW moments after a
    few steps (measured: 6e-7 apart at most): 1e-5 absolute, far below one step's motion (lr
    ~5e-4) and what a wrong batch or gradient would do.
    """
    metrics, expected = read_metrics(workdir), read_metrics(reference)
    steps = list(range(1, config.total_steps + 1))
    assert [m["step"] for m in metrics] == [m["step"] for m in expected] == steps
    np.testing.assert_allclose(
        [m["loss"] for m in metrics], [m["loss"] for m in expected], rtol=1e-5
    )
    # Both checkpoints read back by this one process, as a resume on one process would.
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:devices])
    state, ref_state = read_state(workdir, config, mesh), read_state(reference, config, mesh)
    assert int(state.step) == int(ref_state.step) == config.total_steps
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_partial_distributed_flags_say_what_is_missing(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="needs all three of --coordinator_address"):
        sharding.initialize_distributed(None, 2, 0)
    assert sharding._is_loopback("127.0.0.1:1234") and sharding._is_loopback("[::1]:80")
    assert not sharding._is_loopback("10.0.0.1:1234")


PLACEMENT_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from ml_collections import ConfigDict
from jepa_jax import sharding
sharding.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]), 20)
p, rows = jax.process_index(), 4  # this process's rows of a global batch of 8
for data, fsdp in [(4, 1), (2, 2), (1, 4)]:
    mesh = sharding.make_mesh(ConfigDict({"data": data, "fsdp": fsdp}))
    local = {"x": np.arange(p * rows, (p + 1) * rows, dtype=np.int32)[:, None].repeat(3, 1)}
    x = sharding.global_batch(mesh, local)["x"]
    assert x.shape == (8, 3), x.shape
    expected = jnp.arange(8, dtype=jnp.int32)[:, None]
    ok = jax.jit(lambda x: jnp.all(x == expected), out_shardings=sharding.replicated(mesh))(x)
    print(f"mesh {data}x{fsdp}: rows in place {bool(ok)}", flush=True)
"""


def test_global_batch_puts_each_process_rows_in_place(tmp_path):
    """Each process's rows land at their global index (p*L ..) on every mesh shape: a wrong
    placement would only reorder the batch, which the loss alone would hardly show."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PLACEMENT_SCRIPT, f"127.0.0.1:{port}", str(i)],
            cwd=REPO,
            env=child_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=RUN_TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
        for mesh in ("4x1", "2x2", "1x4"):
            assert f"mesh {mesh}: rows in place True" in out, out


def test_two_processes_train_like_one(tmp_path):
    """2 processes x 2 devices, FSDP over all 4 (parameters split across the processes, each
    process writing its own shards): the same losses and final state as one process with 4."""
    config = tiny_config(steps=3, data=1, fsdp=4)
    run, ref = tmp_path / "run", tmp_path / "ref"
    launches = [
        Launch(tmp_path, "run", run, config, processes=2, devices=2),
        Launch(tmp_path, "ref", ref, config, processes=1, devices=4),
    ]
    for launch in launches:
        assert launch.wait() == [0] * len(launch.procs), launch.logs_tail()
    two = launches[0]
    assert "step 3/3" in two.log(0) and "step 1/3" not in two.log(1)  # process 0 reports
    state_dir = run / "checkpoints" / "3" / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
    assert_same_run(run, ref, config, devices=4)


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="reads the checkpoints on 8 devices")
def test_four_processes_data_and_fsdp(tmp_path):
    """4 processes x 2 devices on a (data 2, fsdp 4) mesh: both axes span processes."""
    config = tiny_config(steps=3, data=2, fsdp=4)
    run, ref = tmp_path / "run", tmp_path / "ref"
    run_to_the_end(tmp_path, "ref", ref, config, processes=1, devices=8)
    run_to_the_end(tmp_path, "run", run, config, processes=4, devices=2)
    assert_same_run(run, ref, config, devices=8)


def stopped_at(out: str) -> int:
    found = re.findall(r"Stopped by \w+ after step (\d+);", out)
    assert len(found) == 1, out
    return int(found[0])


@pytest.mark.slow
def test_sigterm_to_one_process_then_resume_on_other_process_counts(tmp_path):
    """Data parallel over 2 processes; SIGTERM to process 1 alone: both save the same step and
    exit 0. One process (4 devices) resumes that checkpoint and is stopped in turn; two
    processes resume its checkpoint and finish: the run equals one uninterrupted process's."""
    config = tiny_config(steps=8, data=-1, fsdp=1)
    workdir, ref = tmp_path / "run", tmp_path / "ref"
    run_to_the_end(tmp_path, "ref", ref, config, processes=1, devices=4)

    first = Launch(tmp_path, "first", workdir, config, processes=2, devices=2)
    first.wait_for("step 1/8")
    first.procs[1].send_signal(signal.SIGTERM)
    assert first.wait() == [0, 0], first.logs_tail()
    k1 = stopped_at(first.log(0))
    assert 1 <= k1 < 6, first.logs_tail()
    assert os.listdir(workdir / "checkpoints") == [str(k1)]  # one checkpoint, written by both
    state_dir = workdir / "checkpoints" / str(k1) / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))

    second = Launch(tmp_path, "second", workdir, config, processes=1, devices=4)
    second.wait_for(f"step {k1 + 1}/8")
    second.procs[0].send_signal(signal.SIGTERM)
    assert second.wait() == [0], second.logs_tail()
    out = second.log(0)
    assert f"Resumed from step {k1}" in out, out
    k2 = stopped_at(out)
    assert k1 < k2 < 8, out

    third = run_to_the_end(tmp_path, "third", workdir, config, processes=2, devices=2)
    assert f"Resumed from step {k2}" in third.log(0)
    assert_same_run(workdir, ref, config, devices=4)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_sigkill_of_one_process_makes_the_others_fail_fast(tmp_path, victim):
    """SIGKILL one process mid-run (process 0 hosts the coordinator): the other stops with a
    non-zero status and a message saying another process died, within --distributed_timeout.

    Three ways, all bounded: the survivor's collective fails at once (the peer's sockets closed):
    our one line, exit 1, in seconds; or it waits on the dead peer until JAX's coordination
    service misses its heartbeats for the timeout and terminates the survivor with its message;
    or, when the victim hosted that service (process 0) and the survivor is between collectives,
    its next call to the service finds the socket closed and JAX terminates it with the same
    message at once.
    """
    config, timeout_s = tiny_config(steps=200, data=-1, fsdp=1), 10
    launch = Launch(tmp_path, "kill", tmp_path / "run", config, 2, 2, timeout_s=timeout_s)
    launch.wait_for("step 2/200")
    launch.procs[victim].kill()
    killed = time.time()
    survivor = 1 - victim
    try:
        code = launch.procs[survivor].wait(timeout=2 * timeout_s + 30)
    except subprocess.TimeoutExpired:
        launch.kill()
        pytest.fail(f"process {survivor} still runs after its peer died\n{launch.logs_tail()}")
    elapsed = time.time() - killed
    out = launch.log(survivor)
    assert code != 0, out
    ours = f"error: process {survivor} of 2 stopped on "
    if ours in out:
        last = out.strip().splitlines()[-1]
        assert last.startswith(ours) and "another process of this run failed or was killed" in last
        assert elapsed < timeout_s, (elapsed, out)
    else:
        assert "Terminating process because the JAX distributed service detected fatal" in out
        assert "another task died" in out
        # Missed heartbeats, or the service's own process gone (only process 0 hosts it).
        lost_service = victim == 0 and "Failed to send RPC to coordination service" in out
        assert "stopped sending heartbeats" in out or lost_service, out[-3000:]
        # Heartbeats are checked every few seconds: the timeout plus one check.
        assert elapsed < timeout_s + 15, (elapsed, out)
    print(f"victim {victim}: survivor exited {code} after {elapsed:.1f} s")
