"""The command line's grammar: argparse's parser of every command and flag
(docs/commands.md).

cli.py parses a command given alone, as the container runs `init`, without it: argparse
with gettext, and the parser's 39 `add_argument`s, cost milliseconds natively at every
start, some thirty times that under emulation. What `parser()` here makes of such a
command is what that shortcut must equal (tests/unit/test_cli.py compares them for each).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from nvdriver import __version__


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return n


def _help_width() -> int:
    """The width argparse gives its help, less 2 as it does: the terminal's of stdout, else
    80. Unlike `shutil.get_terminal_size()` it does not read COLUMNS: the environment is
    read in config.py only (tests/unit/test_config.py), and the CLI parses before that."""
    columns = 0
    if sys.__stdout__ is not None:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, its width found without `shutil`: argparse makes a formatter at
    each `add_argument` (to check the metavar), and its own asks `shutil`, which imports
    the bz2, lzma and zlib modules at every command's start."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_help_width())


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser with `_HelpFormatter` (the subcommands' too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _common(debug_default: object) -> _Parser:
    p = _Parser(add_help=False)
    p.add_argument(
        "--debug", action="store_true", default=debug_default, help="show tracebacks and commands"
    )
    return p


def _build_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", "--kernel", metavar="RELEASE", help="kernel release (default: running)")
    p.add_argument("-s", "--sign", metavar="KEY", type=Path, help="sign the modules with KEY")
    p.add_argument("-t", "--tag", metavar="TAG", help="tag of the package")
    p.add_argument("-m", "--max-threads", metavar="N", type=_positive, help="build jobs")
    p.add_argument(
        "--kernel-source",
        metavar="DIR",
        type=Path,
        help="build against this prepared kernel tree instead of the Flatcar developer container",
    )
    p.add_argument(
        "--emerge-sources",
        action="store_true",
        default=None,
        help="get the kernel tree with `emerge coreos-sources` in the developer container "
        "(old releases without /lib/modules/KERNEL/build; needs network)",
    )
    p.add_argument(
        "--flatcar-version",
        metavar="V",
        help="build for the kernel of Flatcar release V (in its developer container)",
    )
    p.add_argument(
        "--next",
        action="store_true",
        default=None,
        help="build for the newest release of the host's channel with another kernel "
        "(ahead of the reboot); nothing to do when there is none",
    )
    p.add_argument(
        "--store",
        choices=("image", "node"),
        help="write into the image's store (PRECOMPILED_DIR, default) or the node's "
        "(NODE_PRECOMPILED_DIR)",
    )
    p.add_argument(
        "--push",
        metavar="REF",
        help="push the package, signed with PRECOMPILED_SIGNING_KEY, to the OCI registry "
        "repository REF (HOST[:PORT]/REPO)",
    )


def _pull_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pull",
        metavar="REF",
        help="look for the package in the OCI registry repository REF (HOST[:PORT]/REPO) "
        "before building one (as PRECOMPILED_REGISTRY)",
    )


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="nvidia-driver",
        description="NVIDIA driver container for Flatcar Container Linux.",
        parents=[_common(False)],
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    common = _common(argparse.SUPPRESS)

    p = sub.add_parser(
        "init", parents=[common], help="build or find, link and load the driver, then wait"
    )
    p.add_argument("-a", "--accept-license", action="store_true", help="accept NVIDIA's license")
    p.add_argument("-m", "--max-threads", metavar="N", type=_positive, help="build jobs")
    _pull_flag(p)

    for name, text in (
        ("update", "build and pack the precompiled package for a kernel"),
        ("build", "the same as update"),
    ):
        _build_flags(sub.add_parser(name, parents=[common], help=text, description=text))

    _pull_flag(
        sub.add_parser("load", parents=[common], help="link, install and load from a package")
    )
    sub.add_parser("unload", parents=[common], help="stop daemons, unload modules, unmount")
    p = sub.add_parser("status", parents=[common], help="kernel, driver, packages, modules, GPUs")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p = sub.add_parser("packages", parents=[common], help="the precompiled package store")
    p.add_argument("action", nargs="?", choices=("list", "verify", "prune"), default="list")
    p.add_argument("--json", action="store_true", help="JSON output (list)")
    sub.add_parser("validate", parents=[common], help="nvidia-smi and a CUDA check")
    return top
