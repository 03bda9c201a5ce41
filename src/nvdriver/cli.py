"""Commands (docs/commands.md); the steps themselves live in lifecycle, the flags in flags.py.

A command given alone (`ALONE`: the container's `init`) is parsed here, anything else by
argparse. Each command imports the modules it calls when it runs: `--help` and a usage
error load nothing of the driver, `status` none of lifecycle's, `init` nothing of a build
and no argparse (tests/unit/test_imports.py keeps it so).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

from nvdriver.errors import DriverError, ExitCode, Interrupted

if TYPE_CHECKING:
    from argparse import Namespace

    from nvdriver.config import Config

log = logging.getLogger("nvdriver")

# What argparse makes of each of these commands given alone, with no flag: the container's
# `init`, the preStop's `unload`, a probe's `status`. They are parsed without it.
ALONE: dict[str, dict[str, object]] = {
    "init": {"accept_license": False, "max_threads": None, "pull": None},
    "load": {"pull": None},
    "unload": {},
    "status": {"json": False},
    "packages": {"action": "list", "json": False},
    "validate": {},
}


def parse_args(argv: Sequence[str] | None = None) -> Namespace:
    """The command line: a command alone from `ALONE`, anything else (a flag, `--help`, a
    usage error, which ends here) with argparse (flags.py)."""
    words = sys.argv[1:] if argv is None else list(argv)
    if len(words) == 1 and words[0] in ALONE:
        alone = SimpleNamespace(debug=False, command=words[0], **ALONE[words[0]])
        return cast("Namespace", alone)
    from nvdriver import flags

    return flags.parser().parse_args(words)


def config_from_args(args: Namespace, env: dict[str, str]) -> Config:
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


def dispatch(args: Namespace, config: Config) -> int:
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


def _packages(args: Namespace, config: Config) -> int:
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
    args = parse_args(argv)
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
