"""Pretrain I-JEPA: `python train.py --config=configs/default.py:tiny --workdir=/tmp/ijepa`."""

from absl import app, flags
from ml_collections import config_flags

from jepa_jax import trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py:tiny", "Config file and preset.")
flags.DEFINE_string("workdir", None, "Where metrics (and checkpoints) are written.", required=True)


def main(argv):
    del argv
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
