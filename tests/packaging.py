"""Helpers to make packages and hostile archives for tests (real files, real tar)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.driver.build import Artifact, BuildOutput
from nvdriver.driver.package import Package
from nvdriver.driver.source import DriverSource
from nvdriver.host import KernelIdentity
from nvdriver.run import run

# The Flatcar release a fake developer-container build stands for (builder's prune keeps it).
FAKE_RELEASE = "4152.2.3"

KERNEL = KernelIdentity(
    "6.1.0-99-amd64",
    "Linux version 6.1.0-99-amd64 (x@y) (gcc 12) #1 SMP Debian 6.1.1",
    "6.1.0-99-amd64 SMP preempt mod_unload modversions ",
    (("__fentry__", 0xBDFB6DBB), ("_printk", 0x92997ED8)),
)


def fake_build(tmp: Path, kernel: KernelIdentity = KERNEL, size: int = 4096) -> BuildOutput:
    """A build output of plain files: enough to pack and verify, not to load."""
    tree = tmp / "kernel"
    (tree / "nvidia").mkdir(parents=True)
    (tree / "nvidia" / "nv-kernel.o_binary").write_bytes(b"core" * 100)
    (tree / "nv-linux.o").write_bytes(random.randbytes(size))
    (tree / "nvidia-uvm.ko").write_bytes(random.randbytes(size))
    lds = tmp / "module.lds"
    lds.write_text("SECTIONS { }\n")
    return BuildOutput(
        kernel=kernel,
        flavour="proprietary",
        driver_version="535.261.03",
        tree=tree,
        artifacts=(
            Artifact("nvidia", tree / "nv-linux.o", core="nvidia/nv-kernel.o_binary"),
            Artifact("nvidia-uvm", tree / "nvidia-uvm.ko"),
        ),
        ld_scripts=(lds,),
        compiler="gcc-12 (Debian 12.2.0-14) 12.2.0",
        linker="GNU ld (GNU Binutils for Debian) 2.40",
    )


def hostile_package(
    path: Path, evil: tarfile.TarInfo, data: bytes = b"", *, format: int = 2
) -> None:
    """A package whose manifest is valid but which carries `evil` as a member."""
    manifest = {
        "format": format,
        "driver_version": "535.261.03",
        "flavour": "open",
        "kernel_release": KERNEL.release,
        "kernel_version": KERNEL.version,
        "kernel_vermagic": KERNEL.vermagic,
        "kernel_symbols": {name: f"0x{crc:08x}" for name, crc in KERNEL.symbols},
        "compiler": "gcc",
        "linker": "ld",
        "modules": [],
        "ld_scripts": [],
        "files": {},
        "created": "2026-01-01T00:00:00+00:00",
        "tag": None,
        "signing": None,
    }
    raw = json.dumps(manifest).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
        evil.size = len(data) if evil.isfile() else 0
        tar.addfile(evil, io.BytesIO(data) if evil.isfile() else None)


def host_build_tree(host_modules: Path, kernel: KernelIdentity) -> Path:
    """A build tree of the running kernel on the host (`HOST/lib/modules/RELEASE/build`),
    its Module.symvers holding `kernel`'s CRCs: what kmod/abi.py reads as evidence."""
    build = host_modules / kernel.release / "build"
    build.mkdir(parents=True)
    lines = [f"0x{crc:08x}\t{name}\tvmlinux\tEXPORT_SYMBOL\t\n" for name, crc in kernel.symbols]
    (build / "Module.symvers").write_text("".join(lines))
    return build


def linkable_build(work: Path, source: DriverSource, kernel: KernelIdentity) -> BuildOutput:
    """A build of `source` that links for real on this machine: nvidia split into an empty
    interface object (`as`) and the stand-in's core object (tests/standin), nvidia-uvm a
    finished plain file. `ld -r` and depmod take it; no kernel would load it."""
    work.mkdir(parents=True)
    interface = work / "nv-linux.o"
    run(["as", "/dev/null", "-o", interface])
    (work / "nvidia-uvm.ko").write_bytes(random.randbytes(4096))
    lds = work / "module.lds"
    lds.write_text("SECTIONS { }\n")
    return BuildOutput(
        kernel=kernel,
        flavour="proprietary",
        driver_version=source.version,
        tree=source.flavour_dir("proprietary"),
        artifacts=(
            Artifact("nvidia", interface, core="nvidia/nv-kernel.o_binary"),
            Artifact("nvidia-uvm", work / "nvidia-uvm.ko"),
        ),
        ld_scripts=(lds,),
        compiler="gcc-12 (Debian 12.2.0-14) 12.2.0",
        linker=run(["ld", "--version"]).stdout.splitlines()[0].strip(),
    )


def package_for_running_kernel(config: Config, work: Path) -> Package:
    """A linkable package (`linkable_build`) in the image's store that fits the running
    kernel: the host's build tree says the package's CRCs (`host_build_tree`)."""
    kernel = KernelIdentity.running(config).with_abi(KERNEL.vermagic, dict(KERNEL.symbols))
    host_build_tree(config.host("/lib/modules"), kernel)
    build = linkable_build(work, DriverSource.from_config(config), kernel)
    return pkg.write_package(config.precompiled_dir, build, tag=None)
