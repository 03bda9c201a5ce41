"""The stand-in driver tree builds against the installed kernel headers, and
the modules it gives behave like NVIDIA's at the module level: the node-side
link of nv-linux.o with the core gives the same module Kbuild links, with the
dependencies NVIDIA's modules have."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import kernels
from tests.conftest import kernel_param, kernel_params, need

from .tree import (
    CORES,
    DEFAULT_VERSION,
    HOLDER_MODULE,
    INTERFACES,
    MODULES,
    build_holder,
    build_standin,
    kernel_release,
    link_module,
    make_standin_source,
    module_lds,
)

TOOLS = ("make", "gcc", "ld", "nm", "modinfo", "depmod")
MISSING_TOOLS = [t for t in TOOLS if shutil.which(t) is None]
# depmod and modinfo live in /sbin on Debian: look there too.
MISSING_TOOLS = [t for t in MISSING_TOOLS if not Path("/usr/sbin", t).exists()]


def tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def out(*cmd: str | Path) -> str:
    return subprocess.run(
        [os.fspath(c) for c in cmd], check=True, capture_output=True, text=True
    ).stdout


def modinfo(field: str, ko: Path) -> str:
    return out(tool("modinfo"), "-F", field, ko).strip()


def undefined(obj: Path) -> list[str]:
    return sorted(line.split()[-1] for line in out("nm", "-u", obj).splitlines() if line.strip())


def test_source_layout_and_version(tmp_path: Path) -> None:
    need(shutil.which("gcc") is not None, "needs gcc")
    dest = make_standin_source(tmp_path / "nvidia-570.1.2", version="570.1.2", peermem=True)
    assert dest == tmp_path / "nvidia-570.1.2"
    for flavour in ("kernel", "kernel-open"):
        tree = dest / flavour
        kbuild = (tree / "Kbuild").read_text()
        assert 'ccflags-y += -DNV_VERSION_STRING=\\"570.1.2\\"\n' in kbuild
        assert DEFAULT_VERSION not in kbuild
        for module in (*MODULES, "nvidia-peermem"):
            assert (tree / module / f"{module}.Kbuild").is_file()
        for binary in CORES.values():
            core = tree / binary
            assert core.read_bytes()[:4] == b"\x7fELF"
            # The core talks to the kernel only through its interface layer
            # (and the kernel's retpoline thunks, as NVIDIA's cores do).
            allowed = re.compile(r"^(nvstandin_os_\w+|nvkms_\w+|__x86_indirect_thunk_\w+)$")
            if shutil.which("nm"):
                assert all(allowed.match(s) for s in undefined(core)), undefined(core)
    ident = b"NVIDIA UNIX Open Kernel Module for x86_64  570.1.2"
    open_core = (dest / "kernel-open/nvidia/nv-kernel.o_binary").read_bytes()
    proprietary_core = (dest / "kernel/nvidia/nv-kernel.o_binary").read_bytes()
    assert ident in open_core
    assert ident not in proprietary_core
    assert b"NVIDIA UNIX x86_64 Kernel Module  570.1.2" in proprietary_core


def test_bad_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_standin_source(tmp_path, version='1.2"; rm -rf /')


@dataclass
class Built:
    kernel_build: Path
    release: str
    tree: Path
    linked: dict[str, Path]


@pytest.fixture(scope="module", params=kernel_params(kernels.header_kernels()))
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The stand-in built for each kernel with headers here; under CI a series of
    CI_SERIES without them fails (conftest `kernel_params`)."""
    what = "kernel build directory (/lib/modules/K/build)"
    release = kernel_param(request.param, what, kernels.header_kernels())
    need(not MISSING_TOOLS, f"missing {MISSING_TOOLS}")
    kernel_build = kernels.MODULES_DIR / release / "build"
    dest = make_standin_source(tmp_path_factory.mktemp("src"), flavours=("kernel",))
    tree = dest / "kernel"
    build_standin(tree, kernel_build)
    lds = module_lds(kernel_build)
    linked_dir = tree.parent / "linked"
    linked = {
        module: link_module(linked_dir / f"{module}.ko", tree / interface, tree / core, lds)
        for module, (interface, core) in INTERFACES.items()
    }
    return Built(kernel_build, kernel_release(kernel_build), tree, linked)


def test_build_gives_modules_and_interfaces(built: Built) -> None:
    for name in ("nv-linux.o", "nv-modeset-linux.o", "Module.symvers", "modules.order"):
        assert (built.tree / name).is_file(), name
    for module in MODULES:
        assert (built.tree / f"{module}.ko").is_file(), module
    assert not (built.tree / "nvidia-peermem.ko").exists()
    # Kbuild links the cores through symlinks, as NVIDIA's tree does.
    assert (built.tree / "nvidia/nv-kernel.o").is_symlink()
    assert (built.tree / "nvidia-modeset/nv-modeset-kernel.o").is_symlink()
    symvers = (built.tree / "Module.symvers").read_text()
    assert "nvidia_standin_register_client" in symvers
    assert "nvKmsKapiGetFunctionsTable" in symvers


def test_node_link_equals_kbuild_link(built: Built) -> None:
    for module, ko in built.linked.items():
        kbuild_ko = built.tree / f"{module}.ko"
        vermagic = modinfo("vermagic", ko)
        assert vermagic.split()[0] == built.release
        assert vermagic == modinfo("vermagic", kbuild_ko)
        assert modinfo("version", ko) == DEFAULT_VERSION
        assert undefined(ko) == undefined(kbuild_ko), module
        assert modinfo("depends", ko) == modinfo("depends", kbuild_ko)
    assert modinfo("depends", built.linked["nvidia"]) == ""
    assert modinfo("license", built.linked["nvidia"]) == "Dual MIT/GPL"
    params = modinfo("parm", built.linked["nvidia"])
    for name in (
        "NVreg_EnableGpuFirmware",
        "NVreg_RegistryDwords",
        "NVreg_ModifyDeviceFiles",
        "NVreg_StandinNoGpu",
    ):
        assert f"{name}:" in params
    # A distribution module of the same kernel carries the same vermagic.
    shipped = next((built.kernel_build.parent / "kernel").rglob("*.ko*"), None)
    if shipped is not None:
        assert modinfo("vermagic", built.linked["nvidia"]) == modinfo("vermagic", shipped)


def test_dependencies_and_depmod(built: Built, tmp_path: Path) -> None:
    assert modinfo("depends", built.tree / "nvidia-uvm.ko") == "nvidia"
    assert modinfo("depends", built.tree / "nvidia-modeset.ko") == "nvidia"
    assert modinfo("depends", built.tree / "nvidia-drm.ko") == "nvidia-modeset"
    assert "modeset:" in modinfo("parm", built.tree / "nvidia-drm.ko")
    assert "uvm_perf_prefetch_enable:" in modinfo("parm", built.tree / "nvidia-uvm.ko")

    # The node's install: linked modules plus the plain ones, then depmod -b.
    moddir = tmp_path / "lib/modules" / built.release / "kernel/drivers/video"
    moddir.mkdir(parents=True)
    for module in MODULES:
        src = built.linked.get(module, built.tree / f"{module}.ko")
        shutil.copy2(src, moddir / f"{module}.ko")
    out(tool("depmod"), "-b", tmp_path, built.release)
    dep = (tmp_path / "lib/modules" / built.release / "modules.dep").read_text()
    deps = {
        Path(k).name: [Path(v).name for v in vs.split()]
        for k, vs in (line.split(":", 1) for line in dep.splitlines())
    }
    assert deps == {
        "nvidia.ko": [],
        "nvidia-uvm.ko": ["nvidia.ko"],
        "nvidia-modeset.ko": ["nvidia.ko"],
        "nvidia-drm.ko": ["nvidia-modeset.ko", "nvidia.ko"],
    }


def test_holder_depends_on_nvidia(built: Built, tmp_path: Path) -> None:
    ko = build_holder(tmp_path / "holder", built.kernel_build, built.tree / "Module.symvers")
    assert ko.name == f"{HOLDER_MODULE}.ko"
    assert modinfo("depends", ko) == "nvidia"
    assert modinfo("vermagic", ko) == modinfo("vermagic", built.linked["nvidia"])
