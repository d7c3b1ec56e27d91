"""Every mistake a user can make through train.py ends in one line on stderr and exit status 2;
a non-finite step changes nothing, and on_nan=stop ends the run saving nothing new."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.default import get_config
from jepa_jax import checkpoint, errors, trainer
from jepa_jax.totals import NonFiniteError, RunTotals

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mistakes(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    return {
        "misspelled field": (
            ["--config.batchsize=8"],
            "unknown config field 'batchsize'; did you mean 'batch_size'?",
        ),
        "bad value": (["--config.total_steps=many"], "bad config override: flag --config.total_"),
        "bad choice": (["--config.model.attention=flash"], "config.model.attention='flash'"),
        "unknown preset": (["--config=configs/default.py:huge"], "unknown preset 'huge'"),
        "missing path": (
            ["--config.data.source=folder", f"--config.data.path={tmp_path / 'nope'}"],
            "does not exist",
        ),
        "empty folder": (
            ["--config.data.source=folder", f"--config.data.path={empty}"],
            "no images found under config.data.path",
        ),
        "mesh that does not fit": (["--config.mesh.data=3"], "config.mesh"),
        "cudnn without a GPU": (
            ["--config.model.attention=cudnn"],
            "config.model.attention=cudnn cannot run here: no CUDA GPU",
        ),
    }


def test_each_mistake_is_one_line_on_stderr(tmp_path):
    runs, mistakes = {}, _mistakes(tmp_path)
    if jax.default_backend() == "gpu":
        del mistakes["cudnn without a GPU"]
    for name, (flags, _) in mistakes.items():
        config = [f for f in flags if f.startswith("--config=")] or [
            "--config=configs/default.py:tiny"
        ]
        cmd = [sys.executable, "train.py", *config, f"--workdir={tmp_path / 'run'}"]
        cmd += [f for f in flags if not f.startswith("--config=")]
        runs[name] = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for name, (_, expected) in mistakes.items():
        out, err = runs[name].communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert runs[name].returncode == errors.EXIT_USER_ERROR, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert expected in lines[0], (name, lines[0])
        assert "Traceback" not in out + err
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")


def test_real_bugs_keep_their_traceback(capsys):
    def bug():
        return {}["missing"]  # a KeyError: not a user error

    with pytest.raises(KeyError):
        errors.exit_on_user_error(bug)

    def third_party():
        np.reshape(np.zeros(3), (2, 2))  # a ValueError raised outside this package

    with pytest.raises(ValueError):
        errors.exit_on_user_error(third_party)


def test_absurd_learning_rate_stops_without_saving(tmp_path):
    """lr=1e30: the first update overflows the parameters, every later step is non-finite and
    skipped; after max_nonfinite_steps in a row (steps 2-3) the run stops before saving step 3."""
    config = get_config("tiny")
    config.optim.lr = config.optim.start_lr = 1e30
    config.optim.warmup_steps = 0
    config.total_steps, config.log_every, config.checkpoint_every = 12, 2, 1
    config.max_nonfinite_steps = 2
    config.model.depth = config.model.pred_depth = 1  # the guard is tested, not the model
    with pytest.raises(NonFiniteError) as e:
        trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    message = str(e.value)
    assert "not finite for 2 steps in a row, up to step 3" in message, message
    assert f"last checkpoint ({tmp_path / 'checkpoints' / '2'}) is kept" in message, message
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert saved == [1, 2]  # nothing once the streak reached the limit
    assert checkpoint.Checkpointer(str(tmp_path), config).latest_step == 2


def test_skip_policy_goes_on_and_stop_policy_stops():
    """RunTotals counts skipped steps; only on_nan=stop raises, once a streak reaches the limit."""
    config = get_config("tiny")
    config.max_nonfinite_steps = 2
    for policy in ("skip", "stop"):
        config.on_nan = policy
        totals = RunTotals(config, {"bad_images": 5, "skipped_steps": 1})
        for step, nonfinite in enumerate([0, 1, 0, 1, 1, 0], start=1):
            totals.add({"nonfinite": np.int32(nonfinite), "bad_images": np.int32(1)}, step)
        assert totals.read() == {"bad_images": 11, "skipped_steps": 4}
        if policy == "skip":
            totals.check(None)
        else:
            with pytest.raises(NonFiniteError, match="for 2 steps in a row, up to step 5"):
                totals.check(None)
