"""The official PyTorch I-JEPA checkpoints (.pth.tar) <-> workdirs of this project.

  python -m jepa_jax.convert --checkpoint IN.pth.tar --out WORKDIR [--config=configs/default.py:P]
  python -m jepa_jax.convert --workdir WORKDIR --out OUT.pth.tar

The release saves one dict (encoder, predictor, target_encoder, opt, scaler, epoch, loss,
batch_size, world_size, lr) with DDP's `module.` before every parameter name; see
IJEPA_REFERENCE.md. The model is read off the shapes. A .pth.tar is a pickle: it is read only
with `torch.load(weights_only=True)`, which accepts tensors and plain containers and can run no
code from the file. torch is an optional extra, imported here and nowhere else.

A converted workdir is an ordinary one at step 0: the config's schedules (warmup, cosine, EMA)
run from their start, with the release's AdamW moments and their step count kept for Adam's bias
correction. It has no data position, so the data pipeline starts from its beginning.
"""

from jepa_jax.convert.cli import main
from jepa_jax.convert.layout import SIDECAR, ConvertError
from jepa_jax.convert.write_release import read_workdir, to_release
from jepa_jax.convert.write_workdir import to_workdir

__all__ = ["SIDECAR", "ConvertError", "main", "read_workdir", "to_release", "to_workdir"]
