"""Commands and flags (docs/commands.md); the steps themselves live in lifecycle.

Each command imports the modules it calls when it runs: `--help` and a usage error load
nothing of the driver, `status` none of lifecycle's, `init` nothing of a build
(tests/unit/test_imports.py keeps it so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nvdriver import __version__
from nvdriver.errors import DriverError, ExitCode, Interrupted

if TYPE_CHECKING:
    from nvdriver.config import Config

log = logging.getLogger("nvdriver")


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


def config_from_args(args: argparse.Namespace, env: dict[str, str]) -> Config:
    from nvdriver.config import Config

    flags = {
        "kernel": getattr(args, "kernel", None),
        "kernel_source": getattr(args, "kernel_source", None),
        "emerge_sources": getattr(args, "emerge_sources", None),
        "max_threads": getattr(args, "max_threads", None),
        "accept_license": getattr(args, "accept_license", None) or None,
        "sign_key": getattr(args, "sign", None),
        "tag": getattr(args, "tag", None),
        "debug": args.debug or None,
        "flatcar_version": getattr(args, "flatcar_version", None),
        "next_release": getattr(args, "next", None),
        "store": getattr(args, "store", None),
        "push": getattr(args, "push", None),
        "registry": getattr(args, "pull", None),
    }
    return Config.from_env(env, **flags)


def dispatch(args: argparse.Namespace, config: Config) -> int:
    command = args.command
    if command == "status":
        from nvdriver import status

        report = status.collect(config)
        print(json.dumps(report, indent=2) if args.json else status.render(report))
        return ExitCode.OK
    if command == "validate":
        from nvdriver import validate

        print(json.dumps(validate.validate(config), indent=2))
        return ExitCode.OK
    from nvdriver import lifecycle

    if command == "init":
        lifecycle.init(config)
        return ExitCode.OK
    if command == "load":
        lifecycle.load(config)
        return ExitCode.OK
    if command == "unload":
        lifecycle.unload(config)
        return ExitCode.OK
    if command in ("update", "build"):
        package = lifecycle.update(config)
        if package is not None:  # --next with nothing newer prints nothing
            print(package.path)
        return ExitCode.OK
    assert command == "packages", command
    return _packages(args, config)


def _packages(args: argparse.Namespace, config: Config) -> int:
    from nvdriver import fleet, lifecycle
    from nvdriver.driver.package import stores

    if args.action == "list":
        rows, unreadable = [], []
        for store in stores(config):
            good, bad = store.packages()
            rows += [
                {
                    "path": str(p.path),
                    "store": store.kind,
                    "kernel_release": p.manifest.kernel_release,
                    "driver_version": p.manifest.driver_version,
                    "flavour": p.manifest.flavour,
                    "tag": p.manifest.tag,
                    "created": p.manifest.created,
                    "size": p.size,
                    "modules": [m.name for m in p.manifest.modules],
                    "origin": fleet.origin(store.kind, p.path),
                }
                for p in good
            ]
            unreadable += [(store, p, e) for p, e in bad]
        if args.json:
            listing = {
                "packages": rows,
                "unreadable": [{"path": str(p), "store": s.kind} for s, p, _ in unreadable],
            }
            print(json.dumps(listing, indent=2))
        else:
            for r in rows:
                print(
                    f"{r['kernel_release']}\t{r['driver_version']}\t{r['flavour']}\t"
                    f"{r['tag'] or '-'}\t{r['created']}\t{r['store']}\t{r['path']}"
                )
            for s, p, e in unreadable:
                print(f"unreadable\t{s.kind}\t{p}\t{e.message}")
        return ExitCode.OK
    if args.action == "verify":
        report = lifecycle.verify_packages(config)
        for store, path in report.good:
            print(f"ok\t{store.kind}\t{path}")
        for store, path, why in report.bad:
            print(f"FAILED\t{store.kind}\t{path}\t{why}")
        if report.bad:
            log.error("%d package(s) failed verification and were moved aside", len(report.bad))
            return ExitCode.INTEGRITY
        return ExitCode.OK
    for path in lifecycle.prune_packages(config):
        print(f"removed\t{path}")
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)  # --help and usage errors end here
    from nvdriver import lock, signals
    from nvdriver import log as logsetup
    from nvdriver.config import process_environment
    from nvdriver.run import set_timeouts

    env = process_environment()
    logsetup.setup(env.get("LOG_FORMAT") or "text", debug=args.debug)
    with contextlib.ExitStack() as stack:
        try:
            signals.install()
            config = config_from_args(args, env)
            logsetup.setup(config.log_format, debug=config.debug)
            set_timeouts(dict(config.timeouts))
            if args.command in ("update", "build"):
                # A running `init`'s log shows the update too (errors included).
                stack.enter_context(lock.mirror_to_running_instance(config))
            return int(dispatch(args, config))
        except (DriverError, Interrupted) as e:
            return _report(e, debug=args.debug)
        except (OSError, UnicodeDecodeError) as e:
            # A last resort: each input is checked where it is read, with a message naming
            # it; what slips through still ends as one paragraph and exit 1.
            return _report(
                DriverError(
                    f"Unexpected error: {e}.",
                    hint="This is a bug of nvidia-driver: please report it with the output of "
                    "the same command run with --debug (which shows the traceback).",
                ),
                debug=args.debug,
            )
        except KeyboardInterrupt:
            return int(ExitCode.FAILED)


def _report(e: DriverError | Interrupted, *, debug: bool) -> int:
    """The error for people: message and hint; the traceback only with --debug."""
    if debug:
        log.exception("%s", e.message)
    else:
        log.error("%s", e.message)
    if e.hint:
        log.error("%s", e.hint)
    return int(e.exit_code)


if __name__ == "__main__":
    sys.exit(main())
