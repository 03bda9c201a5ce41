"""A node in a fleet: the release it runs, the one it boots into next, where packages came from.

`update --next` (and `--flatcar-version V` for a release newer than the host's, and the
build-ahead watcher) records the next release in `NVIDIA_DRIVER_CACHE/next-release.json`:
`status` shows it without asking the network, and `packages prune` keeps that release's
packages and developer container beside the running one's. A package's origin is its
store (`image`, or `built here` for the node's) unless a sidecar record beside it says
otherwise (`<package>.origin.json`, written after the package by whoever put it there:
a registry pull).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

from nvdriver.atomic import write_atomically
from nvdriver.config import Config
from nvdriver.driver.package import IMAGE_STORE, Package, PackageStore
from nvdriver.flatcar import release
from nvdriver.host import KernelIdentity
from nvdriver.kmod.abi import Fit

log = logging.getLogger(__name__)

NEXT_RECORD = "next-release.json"
ORIGIN_SUFFIX = ".origin.json"
BUILT_HERE = "built here"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record_path(config: Config) -> Path:
    return config.cache_dir / NEXT_RECORD


def write_next(
    config: Config,
    target: release.NamedRelease,
    kernel: KernelIdentity | None,
    *,
    source: str = "feed",
) -> None:
    """Record `target` as the release this node boots into next (`source`: where that was
    learnt, `feed` or `update_engine`); `kernel` once a build found its tree: then a
    second build ahead for the same release finds its package (`built_ahead`)."""
    record = {
        "version": target.release.version,
        "channel": target.release.channel,
        "kernel": target.kernel,
        "kernel_release": kernel.release if kernel else None,
        "kernel_abi": kernel.abi_digest if kernel else None,
        "checked": _now(),
        "source": source,
    }
    _write_record(config, record)
    log.info(
        "Recorded Flatcar %s as the next release in %s", target.release.version, record_path(config)
    )


def _write_record(config: Config, record: dict[str, Any]) -> None:
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(record_path(config), (json.dumps(record, indent=2) + "\n").encode())


def learnt_from(config: Config, version: str, source: str) -> None:
    """Say in the record of `version` where it was learnt (the watcher: `update_engine`
    after a staged build; the child it ran only knew the feed)."""
    record = next_record(config)
    if record is not None and record["version"] == version and record.get("source") != source:
        _write_record(config, {**record, "source": source})


def built_ahead(
    config: Config, target: release.NamedRelease, store: Path, driver_version: str, flavour: str
) -> Package | None:
    """The package a build ahead for `target` already made into `store` (the record names
    its kernel release and ABI: the digest of its vermagic and CRCs), so that the watcher's
    periodic `update --next` and a staged build after it do not compile the same package
    again."""
    record = next_record(config)
    if record is None or record["version"] != target.release.version:
        return None
    kernel_release, abi = record.get("kernel_release"), record.get("kernel_abi")
    if not isinstance(kernel_release, str) or not isinstance(abi, str):
        return None

    def same_abi(kernel: KernelIdentity) -> Fit:
        same = kernel.abi_digest == abi
        return Fit(same, "the ABI of Flatcar's tree" + ("" if same else " differs"))

    return PackageStore(store).find(kernel_release, driver_version, flavour, config.tag, same_abi)


def next_record(config: Config) -> dict[str, Any] | None:
    """The recorded next release, or None: none recorded, unreadable (logged), or not
    newer than the host's release any more (the node has booted into it)."""
    path = record_path(config)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("Ignoring the next-release record %s: %s", path, e)
        return None
    version = record.get("version") if isinstance(record, dict) else None
    if not isinstance(version, str) or not release.VERSION_RE.match(version):
        log.warning("Ignoring the next-release record %s: it names no Flatcar version", path)
        return None
    running = release.host_version(config)
    if running is not None and release.version_key(version) <= release.version_key(running):
        return None
    return dict(record)


def is_ahead(config: Config, target: release.NamedRelease) -> bool:
    """Whether `target` is newer than the host's release (a non-Flatcar host: no)."""
    running = release.host_version(config)
    version = target.release.version
    return running is not None and release.version_key(version) > release.version_key(running)


def origin_path(package: Path) -> Path:
    return package.with_name(package.name + ORIGIN_SUFFIX)


def write_origin(package: Path, record: dict[str, Any]) -> None:
    """The origin record of `package`, written atomically after the package is in place."""
    write_atomically(origin_path(package), (json.dumps(record, indent=2) + "\n").encode())


def origin(store_kind: str, package: Path) -> dict[str, Any]:
    """Where `package` came from: its sidecar record (a registry's reference), else its
    store: `image` (the image's, made by `update` before `docker commit`) or `built here`."""
    try:
        record = json.loads(origin_path(package).read_text())
    except FileNotFoundError:
        record = None
    except (OSError, ValueError) as e:
        log.warning("Ignoring the origin record of %s: %s", package, e)
        record = None
    if isinstance(record, dict) and isinstance(record.get("origin"), str):
        return record
    return {"origin": "image" if store_kind == IMAGE_STORE else BUILT_HERE}


def remove_orphan_origins(root: Path) -> list[Path]:
    """Origin records under a store whose package is gone."""
    removed = []
    for record in sorted(root.glob(f"*/*{ORIGIN_SUFFIX}")) if root.is_dir() else []:
        if not record.with_name(record.name[: -len(ORIGIN_SUFFIX)]).exists():
            record.unlink(missing_ok=True)
            removed.append(record)
    return removed


def kept_kernels(config: Config) -> set[str]:
    """The kernels whose packages `packages prune` keeps: the running one, and the next
    release's (once a build found its tree)."""
    kept = {os.uname().release}
    record = next_record(config)
    if record is not None and isinstance(record.get("kernel_release"), str):
        kept.add(record["kernel_release"])
    return kept


def kept_releases(config: Config) -> set[str]:
    """The Flatcar releases whose developer containers `packages prune` keeps: the running
    one (a rebuild for this kernel needs it) and the next one (built ahead for the reboot)."""
    record = next_record(config)
    kept = {release.host_version(config), record["version"] if record else None}
    return {v for v in kept if v is not None}


def prune_developer_containers(config: Config, *, also_keep: Collection[str] = ()) -> list[Path]:
    """Remove the cached developer containers (gigabytes each) of the releases other than
    `kept_releases` and `also_keep` (the one a build just used). Only where no build runs:
    by `packages prune` when builds are idle, and by a build, holding the build lock,
    once its package is written."""
    from nvdriver.flatcar import fetch  # http, ssl: not on the init path

    kept = kept_releases(config) | set(also_keep)
    removed = []
    for dirs in fetch.cached_versions(config).values():
        for d in dirs:
            if d.name not in kept:
                log.info("Removing the Flatcar %s developer container %s", d.name, d)
                shutil.rmtree(d, ignore_errors=True)
                if not d.exists():
                    removed.append(d)
    return removed


def staged_release(config: Config) -> dict[str, Any] | None:
    """The release update_engine has staged for the next reboot (a local call on the host's
    bus, bounded by staged.TIMEOUT; None without a bus, update_engine or a staged update),
    with the kernel the next-release record names for it once its package was built."""
    from nvdriver.staged import UpdateEngine  # jeepney: only where the bus is asked

    status = UpdateEngine(config).status()
    version = status.staged if status is not None else None
    if version is None:
        return None
    record = next_record(config)
    kernel_release = (
        record.get("kernel_release") if record and record["version"] == version else None
    )
    return {"version": version, "kernel_release": kernel_release}


def _package_row(kind: str, package: Package) -> dict[str, Any]:
    m = package.manifest
    return {
        "path": str(package.path),
        "store": kind,
        "origin": origin(kind, package.path),
        "kernel_release": m.kernel_release,
        "driver_version": m.driver_version,
        "flavour": m.flavour,
        "tag": m.tag,
    }


def releases(
    config: Config, running_kernel: str, listed: list[tuple[str, Package]]
) -> dict[str, Any]:
    """What `status --json` shows under `releases`: the running release, the recorded
    next one and the staged one, each with the packages of both stores for its kernel
    (`listed`: (store kind, package) of every readable package, read once by `status`).
    Reads files only, never the network."""
    rows = [_package_row(kind, p) for kind, p in listed]
    running = {
        "version": release.host_version(config),
        "kernel_release": running_kernel,
        "packages": [r for r in rows if r["kernel_release"] == running_kernel],
    }
    record = next_record(config)
    following = None
    if record is not None:
        kernel_release, kernel = record.get("kernel_release"), record.get("kernel")
        following = {
            **record,
            "packages": [
                r
                for r in rows
                if r["kernel_release"] == kernel_release
                or (
                    kernel_release is None
                    and kernel is not None
                    and release.upstream_kernel(r["kernel_release"]) == kernel
                )
            ],
        }
    return {"running": running, "next": following, "staged": staged_release(config)}
