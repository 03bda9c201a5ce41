"""`status` reads everything from the host tree: modules, daemon, readiness, Flatcar."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nvdriver import daemons, rootfs, status
from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.host import KernelIdentity
from tests.packaging import KERNEL, fake_build, host_build_tree


def test_status_reports_modules_daemon_readiness_and_flatcar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = tmp_path
    (host / "proc").mkdir()
    (host / "proc" / "version").write_text("Linux version 6.12.102-flatcar (build@host) #1 SMP\n")
    (host / "host-etc").mkdir()
    (host / "host-etc" / "os-release").write_text('ID=flatcar\nVERSION="4230.2.3"\n')
    (host / "etc").mkdir()  # the image's own, which must not hide the host's
    (host / "etc" / "os-release").write_text('ID=debian\nVERSION="12 (bookworm)"\n')
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
    pidfile = tmp_path / "container" / "nvidia-persistenced.pid"  # container-own: patched
    monkeypatch.setattr(daemons, "PERSISTENCED_PID", pidfile)
    pidfile.parent.mkdir(parents=True)
    pidfile.write_text(f"{os.getppid()}\n")  # a live process that is not us
    (host / "proc" / str(os.getppid())).symlink_to(f"/proc/{os.getppid()}")
    ready = host / "run" / "nvidia" / "validations" / ".driver-ctr-ready"
    ready.parent.mkdir(parents=True)
    ready.write_text(rootfs.readiness_text({"GDS_ENABLED": False, "GPU_DIRECT_RDMA_ENABLED": True}))
    (ready.parent / ".driver-daemons-status").write_text("Ready")
    config = Config.from_env(
        {"HOST_ROOT": str(host), "PRECOMPILED_DIR": str(tmp_path / "precompiled")}
    )

    report = status.collect(config)
    assert report["flatcar"] == "4230.2.3"
    assert report["os"] == {"id": "flatcar", "version": "4230.2.3"}
    assert [(m["name"], m["refcnt"], m["holders"]) for m in report["modules"]] == [
        ("nvidia", 2, ["nvidia_modeset", "nvidia_uvm"]),
        ("nvidia_uvm", 0, []),
        ("nvidia_modeset", 0, []),
    ]
    assert report["persistenced"]["pid"] == os.getppid()
    assert report["readiness"] == {"GDS_ENABLED": "false", "GPU_DIRECT_RDMA_ENABLED": "true"}
    assert report["daemons_status"] == "Ready"
    assert report["instance"]["pid"] is None
    text = status.render(report)
    assert "flatcar:      4230.2.3" in text
    assert "nvidia 535.261.03 (refcnt 2, used by nvidia_modeset nvidia_uvm)" in text
    assert "ready:        yes (GDS_ENABLED=false, GPU_DIRECT_RDMA_ENABLED=true)" in text
    assert "daemons:      Ready" in text


def test_status_lists_this_kernels_packages_of_both_stores(tmp_path: Path) -> None:
    (tmp_path / "proc").symlink_to("/proc")
    config = Config.from_env(
        {
            "HOST_ROOT": str(tmp_path),
            "PRECOMPILED_DIR": str(tmp_path / "image-store"),
            "NODE_PRECOMPILED_DIR": str(tmp_path / "node-store"),
        }
    )
    running = fake_build(tmp_path / "a", kernel=KernelIdentity.running(config))
    in_image = pkg.write_package(config.precompiled_dir, running, tag=None)
    in_node = pkg.write_package(config.node_precompiled_dir, running, tag="node-built")
    report = status.collect(config)
    assert [(p["store"], p["path"]) for p in report["packages"]] == [
        ("image", str(in_image.path)),
        ("node", str(in_node.path)),
    ]
    text = status.render(report)
    assert f"  {in_image.path} (image's store): fits: " in text
    assert f"  {in_node.path} (node's store): fits: " in text


def test_status_says_which_package_fits_the_running_kernel_and_why(tmp_path: Path) -> None:
    """The node's build tree gives the running kernel's CRCs: a package of another ABI of
    the same release does not fit, and status names the symbol; status moves nothing."""
    (tmp_path / "proc").symlink_to("/proc")
    config = Config.from_env(
        {
            "HOST_ROOT": str(tmp_path),
            "PRECOMPILED_DIR": str(tmp_path / "image-store"),
            "NODE_PRECOMPILED_DIR": str(tmp_path / "node-store"),
        }
    )
    kernel = KernelIdentity.running(config).with_abi(KERNEL.vermagic, dict(KERNEL.symbols))
    host_build_tree(config.host("/lib/modules"), kernel)
    other = kernel.with_abi(kernel.vermagic, {**dict(kernel.symbols), "_printk": 1})
    fits = pkg.write_package(config.precompiled_dir, fake_build(tmp_path / "a", kernel), tag=None)
    stale = pkg.write_package(
        config.node_precompiled_dir, fake_build(tmp_path / "b", other), tag=None
    )
    report = status.collect(config)
    rows = {p["path"]: p for p in report["packages"]}
    assert rows[str(fits.path)]["fits_kernel"] is True
    assert "2 of 2 symbol CRCs agree" in rows[str(fits.path)]["fit"]
    assert rows[str(stale.path)]["fits_kernel"] is False
    assert "_printk" in rows[str(stale.path)]["fit"]
    assert f"  {stale.path} (node's store): does not fit: " in status.render(report)
    assert stale.path.exists(), "status reads, it moves nothing aside"
