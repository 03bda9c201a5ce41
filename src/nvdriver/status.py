"""`nvidia-driver status`: what is here and what is loaded, as one JSON-able report."""

from __future__ import annotations

import time
from typing import Any

from nvdriver import daemons, fabric, fleet, handover, lock, mounts, rootfs
from nvdriver.config import Config
from nvdriver.driver.flavour import choose_flavour
from nvdriver.driver.package import stores
from nvdriver.driver.source import DriverSource
from nvdriver.errors import DriverError
from nvdriver.flatcar.release import host_os_release, host_version
from nvdriver.host import KernelIdentity, nvidia_gpus, read_optional
from nvdriver.kmod.abi import RunningAbi
from nvdriver.kmod.loaded import loaded_modules
from nvdriver.kmod.unloading import UNLOAD_ORDER
from nvdriver.kmod.users import Container


def _readiness(config: Config) -> dict[str, str] | None:
    """The readiness file's `KEY: value` lines (rootfs.readiness_text), or None when it is
    absent."""
    text = read_optional(config.host(rootfs.READY_FILE))
    if text is None:
        return None
    pairs = (line.partition(":") for line in text.splitlines())
    return {key.strip(): value.strip() for key, colon, value in pairs if colon}


def _driver_root_mounted(config: Config) -> bool | None:
    try:
        return mounts.is_mount_point(config.host(rootfs.DRIVER_ROOT))
    except (OSError, DriverError):  # no findmnt, or no mount table to read
        return None


def _users(config: Config) -> dict[str, object] | None:
    """Who holds the loaded driver (our daemons apart), or None when none is loaded."""
    loaded = loaded_modules(config, UNLOAD_ORDER)
    return handover.users(config, loaded).as_json() if loaded else None


def _render_waiting(record: dict[str, Any]) -> str:
    until = record.get("until")
    return (
        f"waiting:      init waits for the loaded driver {record.get('loaded')} to be free to "
        f"replace it with {record.get('wanted')}, since "
        + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.get("since") or 0))
        + (
            ", until " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
            if isinstance(until, int)
            else ", no bound"
        )
    )


def _render_users(users: dict[str, Any]) -> str:
    held = [
        f"pid {p['pid']} ({p['command']})"
        + (f" in {Container(**p['container'])}" if p["container"] else "")
        for p in users["processes"]
    ]
    held += [f"module {m}" for m in users["modules"]]
    if users["unseen_references"]:
        held.append(f"{users['unseen_references']} reference(s) no process here shows")
    return "in use by:    " + ("; ".join(held) or "nobody (but its daemons)")


def collect(config: Config) -> dict[str, Any]:
    kernel = KernelIdentity.running(config)
    os_release = host_os_release(config)
    osr = os_release.values
    gpus = nvidia_gpus(config)
    report: dict[str, Any] = {
        "kernel": {"release": kernel.release, "version": kernel.version},
        "os": {"id": osr.get("ID"), "version": osr.get("VERSION")},
        "driver": {
            "version": config.driver_version,
            "flavour": None,
            "source": None,
            "flavour_reason": None,
            "supported_gpus": None,
            "warning": None,
        },
        "packages": [],
        "flatcar": host_version(config, os_release),
        "instance": {"pid": lock.holder(config), "waiting": handover.read_record(config)},
        "users": _users(config),
        "modules": [
            {
                "name": m.name,
                "refcnt": m.refcnt,
                "holders": list(m.holders),
                "version": m.version,
                "srcversion": m.srcversion,
            }
            for m in loaded_modules(config)
        ],
        "gpus": [
            {
                "address": g.address,
                "device": f"0x{g.device:04x}",
                "class": f"0x{g.pci_class:06x}",
                "driver": g.driver,
            }
            for g in gpus
        ],
        "persistenced": {"pid": daemons.running_pid(config, daemons.PERSISTENCED_PID)},
        "fabric_manager": fabric.report(config),
        "driver_root_mounted": _driver_root_mounted(config),
        "daemons_status": read_optional(config.host(rootfs.DAEMONS_STATUS_FILE)),
        "ready": _readiness(config) is not None,
        "readiness": _readiness(config),
    }
    try:
        source = DriverSource.from_config(config)
        report["driver"].update(version=source.version, source=str(source.root))
        choice = choose_flavour(config, source, gpus)
        report["driver"].update(
            flavour=str(choice.flavour),
            flavour_reason=choice.reason,
            supported_gpus=str(choice.gpu_list) if choice.gpu_list else None,
            warning=choice.warning,
        )
    except DriverError as e:
        report["driver"]["error"] = e.message
    # Every manifest of both stores, read once: for this kernel's rows and for the releases'.
    listed = [(store.kind, p) for store in stores(config) for p in store.packages()[0]]
    running = RunningAbi(config, kernel.release)
    report["packages"] = []
    for kind, p in listed:
        if p.manifest.kernel_release != kernel.release:
            continue
        verdict = running.fit(p.manifest.kernel)
        report["packages"].append(
            {
                "path": str(p.path),
                "store": kind,
                "driver_version": p.manifest.driver_version,
                "flavour": p.manifest.flavour,
                "tag": p.manifest.tag,
                "fits_kernel": verdict.fits,
                "fit": verdict.reason,
            }
        )
    report["releases"] = fleet.releases(config, kernel.release, listed)
    return report


def render(report: dict[str, Any]) -> str:
    k, d = report["kernel"], report["driver"]
    lines = [
        f"kernel:       {k['release']}",
        f"os:           {report['os']['id'] or '?'} {report['os']['version'] or ''}".rstrip(),
        f"flatcar:      {report['flatcar'] or 'no (not a Flatcar host)'}",
        "instance:     "
        + (
            f"init running, pid {report['instance']['pid']}"
            if report["instance"]["pid"]
            else "none"
        ),
        f"driver:       {d['version'] or '?'} ({d['flavour'] or '?'})"
        + (f" — {d['error']}" if d.get("error") else "")
        + (f": {d['flavour_reason']}" if d["flavour_reason"] else ""),
        "gpu list:     " + (d["supported_gpus"] or "not found (supported-gpus.json)"),
        f"packages:     {len(report['packages'])} for this kernel",
    ]
    lines += [
        f"  {p['path']} ({p['store']}'s store): "
        + ("fits" if p["fits_kernel"] else "does not fit")
        + f": {p['fit']}"
        for p in report["packages"]
    ]
    following = report["releases"]["next"]
    lines.append(
        "next release: "
        + (
            f"Flatcar {following['version']}, kernel "
            f"{following['kernel_release'] or following['kernel'] or '?'}, "
            f"{len(following['packages'])} package(s)"
            if following
            else "none recorded (nvidia-driver update --next)"
        )
    )
    mods = report["modules"]
    lines.append(
        "modules:      "
        + (
            ", ".join(
                f"{m['name']} {m['version'] or ''} (refcnt {m['refcnt']}"
                + (f", used by {' '.join(m['holders'])})" if m["holders"] else ")")
                for m in mods
            )
            or "none loaded"
        )
    )
    if report["users"] is not None:
        lines.append(_render_users(report["users"]))
    if report["instance"]["waiting"]:
        lines.append(_render_waiting(report["instance"]["waiting"]))
    lines.append(
        "gpus:         "
        + (
            ", ".join(
                f"{g['address']} {g['device']}" + (f" ({g['driver']})" if g["driver"] else "")
                for g in report["gpus"]
            )
            or "none found"
        )
    )
    if d["warning"]:
        lines.append(f"warning:      {d['warning']}")
    pid = report["persistenced"]["pid"]
    lines.append(f"persistenced: {'running, pid ' + str(pid) if pid else 'not running'}")
    lines.append(_render_fabric(report["fabric_manager"]))
    lines.append(f"daemons:      {report['daemons_status'] or 'no status file'}")
    mounted = report["driver_root_mounted"]
    lines.append(f"driver root:  {rootfs.DRIVER_ROOT} {'mounted' if mounted else 'not mounted'}")
    ready = report["readiness"]
    lines.append(
        "ready:        "
        + ("yes (" + ", ".join(f"{k}={v}" for k, v in ready.items()) + ")" if ready else "no")
    )
    return "\n".join(lines)


def _render_fabric(fm: dict[str, Any]) -> str:
    """One line: none, or the NVSwitches / NVLink5 trays, the daemon, what is missing."""
    if not fm["nvswitches"] and not fm["nvlink5"]:
        return "fabric:       no NVSwitch (no fabric manager needed)"
    devices = [f"{len(fm['nvswitches'])} NVSwitch(es)"] if fm["nvswitches"] else []
    devices += [f"NVLink5 switch tray port(s) {', '.join(fm['nvlink5'])}"] if fm["nvlink5"] else []
    missing = fm["missing"] + fm["nvlsm"]["missing"]
    return (
        f"fabric:       {', '.join(devices)}; "
        + (
            f"nv-fabricmanager running, pid {fm['pid']}"
            if fm["pid"]
            else "nv-fabricmanager not running"
        )
        + (f"; nvlsm pid {fm['nvlsm']['pid']}" if fm["nvlsm"]["pid"] else "")
        + (f"; missing: {', '.join(missing)}" if missing else "")
        + ("; FABRIC_MANAGER=off" if fm["mode"] == "off" else "")
    )
