"""Mistakes a user can make end a command with one line on stderr, not a traceback.

A user error is an exception this package (or a config file) raises on purpose, with a message
that names the cause and the fix: a ValueError, OSError or RuntimeError whose innermost frame is
our own code. Anything else is a bug and keeps its traceback, as does every error when
JEPA_JAX_TRACEBACK=1.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
_OURS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs") + os.sep,
)
_USER_TYPES = (ValueError, OSError, RuntimeError)
EXIT_USER_ERROR = 2


def _raised_by_us(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OURS)


def user_error(exc: BaseException) -> BaseException | None:
    """The deliberate user-facing error in `exc`'s chain (it, or what it was raised from)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _USER_TYPES) and _raised_by_us(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def exit_on_user_error(fn: Callable[..., T], *args, hard_exit: bool = False, **kwargs) -> T:
    """fn(*args, **kwargs); a user error prints `error: <message>` and exits with status 2.

    `hard_exit`: leave at once (os._exit) rather than by SystemExit, for a command's last call:
    its resources are released by then, and interpreter shutdown lets library threads (orbax's)
    race to log a second, long traceback.
    """
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        found = user_error(e)
        if found is None or os.environ.get("JEPA_JAX_TRACEBACK"):
            raise
        message = " ".join(str(found).split())  # one line, whatever the message held
        print(f"error: {message} (JEPA_JAX_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        if hard_exit:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_USER_ERROR)
        sys.exit(EXIT_USER_ERROR)


def _fields(config, prefix: str = "") -> list[str]:
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if hasattr(value, "items"):
            names += _fields(value, f"{prefix}{key}.")
    return names


def check_config_flags(argv: Sequence[str], name: str = "config") -> None:
    """Load --config and apply its --config.FIELD overrides as absl would, before absl does, so
    that an unknown field, a bad value or preset ends in one line (with a did-you-mean)."""
    from absl import flags
    from ml_collections import config_flags

    argv = list(argv)
    spec = [a for a in argv[1:] if re.match(rf"^--?{name}(=|$)", a)]
    if not spec:
        return  # the default config: absl loads it, and it has no overrides to check
    overrides = [a for a in argv[1:] if re.match(rf"^--?(no)?{name}\.", a)]

    def parse(args: list[str]):
        values = flags.FlagValues()
        full = [argv[0], *args]
        config_flags.DEFINE_config_file(name, None, flag_values=values, sys_argv=full)
        values(full)
        return values[name].value

    def load():
        try:
            config = parse(spec)
            known = _fields(config)  # config_flags loads the file lazily: touch it now
        except Exception as e:  # noqa: BLE001 - any failure to load the user's file is theirs
            last = str(e).strip().splitlines()[-1].strip()  # the file's error comes last
            last = re.sub(r"^\w+(Error|Exception): ", "", last)
            raise ValueError(f"cannot load --{name}: {last}") from None
        try:
            parse(spec + overrides)
        except (KeyError, AttributeError, flags.Error) as e:
            raise ValueError(_override_message(e, overrides, known)) from None

    exit_on_user_error(load)


def _override_message(error: Exception, overrides: list[str], known: list[str]) -> str:
    for item in overrides:
        field = item.split("=", 1)[0].split(".", 1)[1]
        if field not in known:
            close = difflib.get_close_matches(field, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; see configs/default.py"
            return f"unknown config field '{field}'{hint}"
    text = " ".join(str(error).split()).replace("\\'", "'")
    return f"bad config override: {text}"
