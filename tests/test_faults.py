"""Faults: a run SIGKILLed at random moments (during asynchronous saves too), then SIGTERMed
(it saves and exits 0), and restarted each time ends exactly where an uninterrupted run does;
a failed checkpoint write says what is kept."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.default import get_config
from jepa_jax import checkpoint, sharding, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# test_checkpoint's reference run has the same schedule.
STEPS, EVERY = 8, 2
# The tiny preset as every run here has it, in-process (_config) and as train.py flags (FLAGS).
# One block each: what is tested is where a run resumes, and each of the ten or so processes
# this harness starts then reaches its steps sooner.
OVERRIDES = {
    "total_steps": STEPS,
    "checkpoint_every": EVERY,
    "log_every": 1,
    "keep_checkpoints": 2,
    "model.depth": 1,
    "model.pred_depth": 1,
}
FLAGS = [f"--config.{field}={value}" for field, value in OVERRIDES.items()]


def _config():
    config = get_config("tiny")
    config.update_from_flattened_dict(OVERRIDES)
    return config


def _start(workdir, env):
    cmd = [sys.executable, "train.py", "--config=configs/default.py:tiny", f"--workdir={workdir}"]
    with open(os.path.join(workdir, "stderr.txt"), "a") as err:
        return subprocess.Popen(
            cmd + FLAGS, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1
        )


def _saving(workdir) -> bool:
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any("tmp" in name for name in os.listdir(folder))


def _read_state(workdir):
    config = _config()
    _, target = trainer.abstract_state(config, sharding.make_mesh(config.mesh))
    return checkpoint.Checkpointer(workdir, config).restore(target, {})[0]


@pytest.fixture(scope="module")
def fast_one_device_env(xla_flags_for_devices):
    """One CPU device and the session's fast compile: with one block each, these runs' steps
    take as long either way (0.26 s), and the step the reference run compiles for all of them
    takes 4 s rather than 10 (12 s of CPU time less)."""
    return dict(os.environ, XLA_FLAGS=xla_flags_for_devices(1))


def test_random_kills_then_resume_equal_an_uninterrupted_run(tmp_path, fast_one_device_env):
    rng = np.random.default_rng()
    reference = tmp_path / "reference"
    reference.mkdir()
    uninterrupted = _start(reference, fast_one_device_env)  # runs beside the killed runs
    # Its first step compiled the step into the session's cache: the killed runs load it rather
    # than each of the first two compiling it at once.
    first = next((line for line in uninterrupted.stdout if line.startswith("step ")), None)
    assert first, (reference / "stderr.txt").read_text()[-2000:]

    run = tmp_path / "killed"
    run.mkdir()
    kills = during_save = 0
    termed = False
    for _ in range(30):
        proc = _start(run, fast_one_device_env)
        # Kill after a random number of logged steps, or as soon as a save is in flight.
        wait_steps, aim_at_save = int(rng.integers(1, 4)), kills % 2 == 1
        seen = 0
        for line in proc.stdout:
            seen += line.startswith("step ")
            if aim_at_save:
                deadline = time.time() + 2
                while not _saving(run) and time.time() < deadline and proc.poll() is None:
                    time.sleep(0.001)
                if _saving(run):
                    during_save += 1
                    break
            elif seen >= wait_steps:
                break
        if proc.poll() is None and kills < 5 + (during_save == 0):
            proc.send_signal(signal.SIGKILL)
            kills += 1
            proc.wait()
            continue
        if proc.poll() is None and not termed:  # then once SIGTERM: save and exit 0
            proc.send_signal(signal.SIGTERM)
            out = proc.stdout.read()
            assert proc.wait(timeout=300) == 0, (run / "stderr.txt").read_text()[-2000:]
            assert "Stopped by SIGTERM after step" in out, out
            termed = True
            continue
        proc.stdout.read()
        assert proc.wait(timeout=300) == 0, (run / "stderr.txt").read_text()[-2000:]
        if os.path.isdir(run / "checkpoints" / str(STEPS)):
            break
    assert kills >= 5 and during_save >= 1 and termed, (kills, during_save, termed)
    uninterrupted.stdout.read()
    assert uninterrupted.wait(timeout=300) == 0, (reference / "stderr.txt").read_text()[-2000:]
    jax.tree.map(
        lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
        _read_state(str(run)),
        _read_state(str(reference)),
    )
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    expected = [json.loads(line) for line in open(reference / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step logged once
    assert [r["loss"] for r in rows] == [r["loss"] for r in expected]


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step > EVERY:
            self.wait_until_finished()  # as the real save does first: the previous one is final
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    config = _config()
    with pytest.raises(RuntimeError) as e:
        trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    message = str(e.value)
    assert f"cannot write the checkpoint of step {2 * EVERY}" in message
    assert "No space left on device" in message
    assert f"the checkpoint of step {EVERY} ({tmp_path / 'checkpoints' / str(EVERY)})" in message
    monkeypatch.undo()
    assert checkpoint.Checkpointer(str(tmp_path), config).latest_step == EVERY
