"""`nvidia-driver status`: what is here and what is loaded, as one JSON-able report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nvdriver.config import Config
from nvdriver.driver.package import PackageStore
from nvdriver.driver.source import MODULE_ORDER, DriverSource, resolve_flavour
from nvdriver.errors import DriverError
from nvdriver.host import KernelIdentity, nvidia_gpus

READY_FILE = "/run/nvidia/validations/.driver-ctr-ready"
PERSISTENCED_PID = "/var/run/nvidia-persistenced/nvidia-persistenced.pid"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _os_release(config: Config) -> dict[str, str]:
    values = {}
    for line in (_read(config.host("/etc/os-release")) or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"')
    return values


def loaded_modules(config: Config) -> list[dict[str, Any]]:
    """NVIDIA modules in /sys/module with their refcounts and versions, in load order."""
    found = []
    for name in MODULE_ORDER:
        sysdir = config.host("/sys/module") / name.replace("-", "_")
        refcnt = _read(sysdir / "refcnt")
        if refcnt is None:
            continue
        found.append(
            {
                "name": name,
                "refcnt": int(refcnt),
                "version": _read(sysdir / "version"),
                "srcversion": _read(sysdir / "srcversion"),
            }
        )
    return found


def _pid_alive(pidfile: Path) -> int | None:
    text = _read(pidfile)
    if not text or not text.isdigit():
        return None
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return int(text)


def collect(config: Config) -> dict[str, Any]:
    kernel = KernelIdentity.running(config)
    osr = _os_release(config)
    gpus = nvidia_gpus(config)
    report: dict[str, Any] = {
        "kernel": {"release": kernel.release, "version": kernel.version},
        "os": {"id": osr.get("ID"), "version": osr.get("VERSION")},
        "driver": {"version": config.driver_version, "flavour": None, "source": None},
        "packages": [],
        "modules": loaded_modules(config),
        "gpus": [
            {"address": g.address, "device": f"0x{g.device:04x}", "class": f"0x{g.pci_class:06x}"}
            for g in gpus
        ],
        "persistenced": {"pid": _pid_alive(config.host(PERSISTENCED_PID))},
        "ready": config.host(READY_FILE).exists(),
    }
    try:
        source = DriverSource.from_config(config)
        report["driver"].update(
            version=source.version,
            source=str(source.root),
            flavour=resolve_flavour(config, source, gpus),
        )
    except DriverError as e:
        report["driver"]["error"] = e.message
    good, _ = PackageStore(config.precompiled_dir).packages()
    report["packages"] = [
        {
            "path": str(p.path),
            "driver_version": p.manifest.driver_version,
            "flavour": p.manifest.flavour,
            "tag": p.manifest.tag,
            "matches_kernel": p.manifest.kernel == kernel,
        }
        for p in good
        if p.manifest.kernel_release == kernel.release
    ]
    return report


def render(report: dict[str, Any]) -> str:
    k, d = report["kernel"], report["driver"]
    lines = [
        f"kernel:       {k['release']}",
        f"os:           {report['os']['id'] or '?'} {report['os']['version'] or ''}".rstrip(),
        f"driver:       {d['version'] or '?'} ({d['flavour'] or '?'})"
        + (f" — {d['error']}" if d.get("error") else ""),
        f"packages:     {len(report['packages'])} for this kernel",
    ]
    lines += [
        f"  {p['path']}{'' if p['matches_kernel'] else ' (other build of this kernel)'}"
        for p in report["packages"]
    ]
    mods = report["modules"]
    lines.append(
        "modules:      "
        + (", ".join(f"{m['name']} (refcnt {m['refcnt']})" for m in mods) or "none loaded")
    )
    lines.append(
        "gpus:         " + (", ".join(g["address"] for g in report["gpus"]) or "none found")
    )
    pid = report["persistenced"]["pid"]
    lines.append(f"persistenced: {'running, pid ' + str(pid) if pid else 'not running'}")
    lines.append(f"ready:        {'yes' if report['ready'] else 'no'}")
    return "\n".join(lines)
