"""Pretrain I-JEPA: `python train.py --config=configs/default.py:tiny --workdir=/tmp/ijepa`."""

import sys

from jepa_jax import errors

if __name__ == "__main__":
    # A mistyped field or value: one line, before absl, and before JAX and the trainer are
    # imported (0.1 s instead of 2.5).
    errors.check_config_flags(sys.argv)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jepa_jax import sharding, trainer  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py:tiny", "Config file and preset.")
flags.DEFINE_string("workdir", None, "Where metrics (and checkpoints) are written.", required=True)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for multi-host runs "
    "outside SLURM / Open MPI (which are detected by themselves).",
)
flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run (with coordinator).")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_integer(
    "distributed_timeout",
    sharding.DISTRIBUTED_TIMEOUT_S,
    "Multi-process runs: seconds after which the other processes give up on one that stopped "
    "answering (killed, crashed, host lost) and all stop, and the most a finished process waits "
    "for the others at exit.",
)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend-probing INFO lines off the console
    errors.exit_on_user_error(
        sharding.initialize_distributed,
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        FLAGS.distributed_timeout,
    )
    # With several processes, an error (often: another process died) exits at once rather than
    # waiting for peers that may be gone; SIGTERM goes through JAX's preemption sync instead.
    sharding.exit_at_once_on_error(
        errors.exit_on_user_error,
        trainer.train_and_evaluate,
        FLAGS.config,
        FLAGS.workdir,
        hard_exit=True,  # the command's last call: leave at once, one line and nothing after
    )


if __name__ == "__main__":
    app.run(main)
