"""`status` reads everything from the host tree: modules, daemon, readiness, Flatcar."""

from __future__ import annotations

import os
from pathlib import Path

from nvdriver import status
from nvdriver.config import Config


def test_status_reports_modules_daemon_readiness_and_flatcar(tmp_path: Path) -> None:
    host = tmp_path
    (host / "proc").mkdir()
    (host / "proc" / "version").write_text("Linux version 6.12.102-flatcar (build@host) #1 SMP\n")
    (host / "etc").mkdir()
    (host / "etc" / "os-release").write_text('ID=flatcar\nVERSION="4230.2.3"\n')
    for name, refcnt, holders in (
        ("nvidia", 2, ["nvidia_modeset", "nvidia_uvm"]),
        ("nvidia_uvm", 0, []),
        ("nvidia_modeset", 0, []),
    ):
        d = host / "sys" / "module" / name
        (d / "holders").mkdir(parents=True)
        (d / "refcnt").write_text(f"{refcnt}\n")
        (d / "version").write_text("535.261.03\n")
        for h in holders:
            (d / "holders" / h).mkdir()
    pidfile = host / "var" / "run" / "nvidia-persistenced" / "nvidia-persistenced.pid"
    pidfile.parent.mkdir(parents=True)
    pidfile.write_text(f"{os.getppid()}\n")  # a live process that is not us
    (host / "proc" / str(os.getppid())).symlink_to(f"/proc/{os.getppid()}")
    ready = host / "run" / "nvidia" / "validations" / ".driver-ctr-ready"
    ready.parent.mkdir(parents=True)
    ready.write_text("GDRCOPY_ENABLED=false\nGDS_ENABLED=false\nGPU_DIRECT_RDMA_ENABLED=true\n")
    config = Config.from_env(
        {"HOST_ROOT": str(host), "PRECOMPILED_DIR": str(tmp_path / "precompiled")}
    )

    report = status.collect(config)
    assert report["flatcar"] == "4230.2.3"
    assert [(m["name"], m["refcnt"], m["holders"]) for m in report["modules"]] == [
        ("nvidia", 2, ["nvidia_modeset", "nvidia_uvm"]),
        ("nvidia_uvm", 0, []),
        ("nvidia_modeset", 0, []),
    ]
    assert report["persistenced"]["pid"] == os.getppid()
    assert report["readiness"]["GPU_DIRECT_RDMA_ENABLED"] == "true"
    assert report["instance"]["pid"] is None
    text = status.render(report)
    assert "flatcar:      4230.2.3" in text
    assert "nvidia 535.261.03 (refcnt 2, used by nvidia_modeset nvidia_uvm)" in text
    assert "ready:        yes (GDRCOPY_ENABLED=false" in text
