"""Module parameters: the `<module>.conf` files of NVIDIA_MODULE_PARAMS_DIR (`/drivers`)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from nvdriver.errors import DriverError, UsageError
from nvdriver.kmod.loaded import sysfs_name
from nvdriver.pattern import Pattern

_PARAM_KEY_RE = Pattern(r"^[A-Za-z_][A-Za-z0-9_]*$")


PARAMS_HINT = "Write one key=value per line, or a modprobe.d line `options MODULE key=value ...`."


def read_params(params_dir: Path, module: str) -> tuple[str, ...]:
    """The parameters of `module` from `params_dir/<module>.conf`, as modprobe arguments.

    The file holds `key=value` lines or modprobe.d `options <module> key=value ...`
    lines; `#` starts a comment line. Values with blanks are quoted (`key="a b"`).
    """
    path = params_dir / f"{module}.conf"
    if not path.is_file():
        return ()
    try:
        text = path.read_bytes().decode()
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path} is not text (byte {e.start} is not UTF-8).",
            hint=PARAMS_HINT,
        ) from None
    except OSError as e:
        raise DriverError(
            f"Cannot read the module parameters {path}: {e.strerror}.",
            hint="Make NVIDIA_MODULE_PARAMS_DIR and its .conf files readable.",
        ) from None
    params: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as e:
            raise _bad_params(path, number, raw, str(e)) from None
        if tokens and tokens[0] == "options":
            if len(tokens) < 2 or sysfs_name(tokens[1]) != sysfs_name(module):
                raise _bad_params(path, number, raw, f"an options line must name {module}")
            tokens = tokens[2:]
        for token in tokens:
            key, sep, value = token.partition("=")
            if not _PARAM_KEY_RE.match(key):
                raise _bad_params(path, number, raw, f"{key!r} is not a parameter name")
            if sep and re.search(r"\s", value):
                value = f'"{value}"'
            params.append(f"{key}{sep}{value}")
    return tuple(params)


def _bad_params(path: Path, number: int, line: str, why: str) -> UsageError:
    return UsageError(
        f"{path} line {number} ({line.strip()!r}) is malformed: {why}.",
        hint=PARAMS_HINT,
    )


def param_value(params: Sequence[str], key: str) -> str | None:
    """The last value given for `key` (as the kernel applies them), unquoted."""
    value = None
    for p in params:
        k, _, v = p.partition("=")
        if k == key:
            value = v.strip('"')
    return value
