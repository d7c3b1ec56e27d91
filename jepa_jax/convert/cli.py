"""`python -m jepa_jax.convert`: the command line over both directions."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from jepa_jax.convert.layout import ConvertError
from jepa_jax.convert.write_release import to_release
from jepa_jax.convert.write_workdir import to_workdir

USAGE = (
    "usage: python -m jepa_jax.convert --checkpoint IN.pth.tar --out WORKDIR "
    "[--config=configs/default.py:PRESET]\n"
    "       python -m jepa_jax.convert --workdir WORKDIR --out OUT.pth.tar"
)


def main(argv: list[str] | None = None) -> int:
    """The command; returns the exit status (errors are one line on stderr)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "A release .pth.tar to convert.", flag_values=fv)
    flags.DEFINE_string("workdir", None, "A workdir or step folder to export.", flag_values=fv)
    flags.DEFINE_string("out", None, "The new workdir, or the .pth.tar to write.", flag_values=fv)
    config_flags.DEFINE_config_file(
        "config", None, "With --checkpoint: configs/default.py:PRESET.", flag_values=fv
    )
    argv = list(sys.argv if argv is None else argv)
    if {"-h", "--help", "-help"} & set(argv[1:]):  # absl's FlagValues has no help flag of its own
        print(f"{USAGE}\n{fv.get_help(include_special_flags=False)}")
        return 0
    try:
        fv(argv)
        if bool(fv.checkpoint) == bool(fv.workdir) or not fv.out:
            raise flags.Error("give --out and exactly one of --checkpoint and --workdir")
        if fv.workdir and fv.config is not None:
            raise flags.Error("--config goes with --checkpoint (a workdir holds its config)")
    except flags.Error as e:
        print(f"convert: {e}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        if fv.checkpoint:
            to_workdir(fv.checkpoint, fv.out, config=fv.config)
        else:
            to_release(fv.workdir, fv.out)
    except (ConvertError, OSError, ValueError, RuntimeError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    return 0
