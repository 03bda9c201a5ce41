"""Build → pack → verify → link → depmod with real tools, on the stand-in driver.

The stand-in (tests/standin) has NVIDIA's tree layout and Makefile interface and
is built by kbuild against the installed Debian headers; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nvdriver.driver import package as pkg
from nvdriver.driver.link import link_package
from nvdriver.driver.source import DriverSource
from nvdriver.errors import DriverError, IntegrityError
from nvdriver.host import KernelIdentity, KernelTree
from nvdriver.kmod.abi import Fit
from nvdriver.kmod.modversions import read_symvers
from tests.conftest import TOOL, need, run_tool, standin_env
from tests.standin.tree import make_standin_source

VERSION = "535.999.01"


def modinfo(ko: Path, field: str) -> str:
    out = subprocess.run(["modinfo", "-F", field, str(ko)], check=True, capture_output=True)
    return out.stdout.decode().strip()


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture(scope="module")
def standin_source(tmp_path_factory) -> Path:
    return make_standin_source(
        tmp_path_factory.mktemp("src") / f"nvidia-{VERSION}", version=VERSION
    )


@pytest.fixture
def env(tmp_path, standin_source) -> dict[str, str]:
    return {**standin_env(tmp_path, standin_source, VERSION), "HOST_ROOT": str(tmp_path / "host")}


@pytest.fixture(scope="module")
def built(tmp_path_factory, standin_source, kernel_build):
    """One `nvidia-driver update` of the stand-in, as a user runs it."""
    base = tmp_path_factory.mktemp("built")
    env = standin_env(base, standin_source, VERSION)
    tool = run_tool("update", "--kernel-source", str(kernel_build), "-m", "2", env=env)
    assert tool.returncode == 0, tool.stderr
    return Path(tool.stdout.strip()), env


def test_update_packs_the_standin_for_the_headers_kernel(built, kernel_build, kernel_release):
    path, env = built
    assert path.parent.name == kernel_release
    m = pkg.read_manifest(path)
    tree = KernelTree.from_dir(kernel_build).output
    info = KernelIdentity.from_build_tree(tree)
    assert (m.kernel.release, m.kernel.version) == (info.release, info.version)
    assert m.kernel_version.startswith(f"Linux version {kernel_release} (")
    # What the kernel checks at load: the vermagic of its own modules, and the CRCs of the
    # kernel symbols the modules import as the tree's Module.symvers has them.
    loop = kernel_build.parent / "kernel/drivers/block/loop.ko"
    assert m.kernel_vermagic is not None
    assert m.kernel_vermagic.rstrip() == modinfo(loop, "vermagic")
    symvers = read_symvers(tree / "Module.symvers")
    assert len(m.kernel_symbols) > 20 and "_printk" in dict(m.kernel_symbols)
    assert all(symvers[name] == crc for name, crc in m.kernel_symbols)
    # Not the symbols the package's own modules export to each other (nvidia-uvm imports
    # nvidia's): those are no kernel's.
    assert all(name in symvers for name, _ in m.kernel_symbols)
    assert (m.driver_version, m.flavour) == (VERSION, "proprietary")
    assert [(e.name, e.file) for e in m.modules] == [
        ("nvidia", "nv-linux.o"),
        ("nvidia-uvm", "nvidia-uvm.ko"),
        ("nvidia-modeset", "nv-modeset-linux.o"),
        ("nvidia-drm", "nvidia-drm.ko"),
    ]
    assert "gcc" in m.compiler and "ld" in m.linker
    # Unlinked: no proprietary .ko in the package.
    assert "nvidia.ko" not in dict(m.files) and "nvidia-modeset.ko" not in dict(m.files)
    assert list(Path(env["NVIDIA_DRIVER_CACHE"], "work").iterdir()) == []


def test_packages_list_and_verify(built, nvidia_driver, kernel_release):
    path, env = built
    listed = nvidia_driver("packages", "list", "--json", env=env)
    assert listed.returncode == 0
    rows = json.loads(listed.stdout)["packages"]
    assert [(r["path"], r["store"], r["kernel_release"], r["flavour"]) for r in rows] == [
        (str(path), "image", kernel_release, "proprietary")  # `update` fills the image's store
    ]
    verified = nvidia_driver("packages", "verify", env=env)
    assert verified.returncode == 0, verified.stderr
    assert f"ok\timage\t{path}" in verified.stdout


def test_linked_modules_have_the_kernels_vermagic_and_dependencies(
    built, tmp_path, standin_source, kernel_build, kernel_release
):
    path, _ = built
    kernel = KernelIdentity.from_build_tree(KernelTree.from_dir(kernel_build).output)
    source = DriverSource(standin_source, VERSION)
    moddir = link_package(path, source, tmp_path / "opt" / VERSION, release=kernel.release)
    assert moddir == tmp_path / "opt" / VERSION / "lib" / "modules" / kernel_release
    assert (moddir / "modules.order").read_text().split() == [
        "nvidia.ko",
        "nvidia-uvm.ko",
        "nvidia-modeset.ko",
        "nvidia-drm.ko",
    ]
    # A module of the same kernel, built by Debian, carries the vermagic to match.
    headers_vermagic = modinfo(kernel_build.parent / "kernel/drivers/block/loop.ko", "vermagic")
    expected_depends = {
        "nvidia": "",
        "nvidia-uvm": "nvidia",
        "nvidia-modeset": "nvidia",
        "nvidia-drm": "nvidia-modeset",
    }
    for name, depends in expected_depends.items():
        ko = moddir / f"{name}.ko"
        vermagic = modinfo(ko, "vermagic")
        assert vermagic.split()[0] == kernel_release
        assert vermagic == headers_vermagic
        assert modinfo(ko, "depends") == depends
    assert modinfo(moddir / "nvidia.ko", "version") == VERSION
    # depmod -b ran on the private tree: dependencies resolve there.
    dep = (moddir / "modules.dep").read_text()
    assert "nvidia-drm.ko: nvidia-modeset.ko nvidia.ko" in dep
    assert not list((tmp_path / "opt" / VERSION).glob(".staging-*"))


def test_a_tampered_package_fails_verify_with_exit_5_and_is_never_linked(
    built, tmp_path, nvidia_driver, standin_source
):
    path, env = built
    copy_dir = tmp_path / "precompiled" / path.parent.name
    copy_dir.mkdir(parents=True)
    copy = copy_dir / path.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    env = {**env, "PRECOMPILED_DIR": str(tmp_path / "precompiled")}
    result = nvidia_driver("packages", "verify", env=env)
    assert result.returncode == 5
    assert "FAILED" in result.stdout and str(copy) in result.stdout
    assert not copy.exists() and len(list(copy_dir.glob("*.failed"))) == 1

    copy.write_bytes(bytes(data))
    base = tmp_path / "opt" / VERSION
    with pytest.raises(IntegrityError):
        link_package(copy, DriverSource(standin_source, VERSION), base)
    assert files_under(base) == []


def test_data_after_the_gzip_stream_is_refused_once_every_member_is_out_and_leaves_nothing(
    built, tmp_path, standin_source
):
    """What follows the package's gzip stream is found only at its end, after every member
    was extracted into the staging tree (package.py `_Gunzip`): the link fails there, and
    neither a tree, nor the staging, nor the package under its name is left."""
    path, _ = built
    copy = tmp_path / "precompiled" / path.parent.name / path.name
    copy.parent.mkdir(parents=True)
    copy.write_bytes(path.read_bytes() + b"\0" * 512)
    base = tmp_path / "opt" / VERSION
    with pytest.raises(IntegrityError, match="data after the gzip stream"):
        link_package(copy, DriverSource(standin_source, VERSION), base)
    assert list(base.iterdir()) == []  # not even an empty staging directory
    assert not copy.exists() and len(list(copy.parent.glob("*.failed"))) == 1


def test_a_package_for_another_kernel_is_refused_and_installs_nothing(
    built, tmp_path, standin_source
):
    path, _ = built
    other = "6.1.0-98-amd64"
    base = tmp_path / "opt" / VERSION
    with pytest.raises(DriverError, match="is for kernel") as e:
        link_package(path, DriverSource(standin_source, VERSION), base, release=other)
    assert e.value.exit_code == 1
    assert files_under(base) == []
    store = pkg.PackageStore(path.parent.parent)
    assert store.find(other, VERSION, "proprietary", None, lambda k: Fit(True, "any")) is None


def test_a_changed_core_object_is_refused(built, tmp_path, standin_source):
    path, _ = built
    changed = tmp_path / "src"
    subprocess.run(["cp", "-a", str(standin_source), str(changed)], check=True)
    core = changed / "kernel" / "nvidia" / "nv-kernel.o_binary"
    core.write_bytes(core.read_bytes() + b"\0")
    base = tmp_path / "opt" / VERSION
    with pytest.raises(IntegrityError, match="differs from the one"):
        link_package(path, DriverSource(changed, VERSION), base)
    assert files_under(base) == []


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ({"DRIVER_VERSION": "535.999"}, 2, "DRIVER_VERSION=535.999 but the driver source"),
        ({"DRIVER_VERSION": "five"}, 2, "DRIVER_VERSION='five' is malformed"),
        ({"NVIDIA_DRIVER_SOURCE": "/nonexistent/nvidia"}, 1, "/nonexistent/nvidia does not exist"),
        ({"KERNEL_MODULE_TYPE": "closed"}, 2, "KERNEL_MODULE_TYPE='closed' is not valid"),
    ],
)
def test_bad_configuration_fails_clearly_and_leaves_nothing(
    env, tmp_path, nvidia_driver, kernel_build, change, code, message
):
    result = nvidia_driver("update", "--kernel-source", str(kernel_build), env={**env, **change})
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert files_under(tmp_path / "precompiled") == []
    assert files_under(tmp_path / "cache" / "work") == []


@pytest.mark.parametrize("tree", ["/nonexistent/build", "/usr/share"])
def test_a_missing_kernel_tree_fails_clearly_and_leaves_nothing(env, tmp_path, nvidia_driver, tree):
    result = nvidia_driver("update", "--kernel-source", tree, env=env)
    assert result.returncode == 1
    assert f"The kernel tree {tree} is missing or not a kernel build tree" in result.stderr
    assert files_under(tmp_path / "precompiled") == []
    assert files_under(tmp_path / "cache" / "work") == []


def test_a_kernel_flag_that_contradicts_the_tree_is_a_usage_error(env, nvidia_driver, kernel_build):
    result = nvidia_driver(
        "update", "--kernel-source", str(kernel_build), "-k", "6.12.102-flatcar", env=env
    )
    assert result.returncode == 2
    assert "does not match the kernel tree" in result.stderr


SECRET = "s3cret-of-the-registry"


def test_no_program_the_build_runs_gets_our_secrets(tmp_path, env, kernel_build):
    """A build with the registry's credentials in our environment: every program it starts
    (make, the compilers make runs, ld, ...) gets the minimal environment. strace
    records each exec's environment, what the child's /proc/PID/environ holds."""
    need(shutil.which("strace") is not None, "needs strace")
    trace = tmp_path / "exec.trace"
    secrets = {"PRECOMPILED_REGISTRY_PASSWORD": SECRET, "PRECOMPILED_REGISTRY_USERNAME": "fleet"}
    full = {**os.environ, **env, **secrets}
    strace = ["strace", "-f", "-qq", "-e", "trace=execve", "-e", "signal=none", "-v"]
    result = subprocess.run(
        [*strace, "-s", "1000000", "-o", trace, TOOL, "update", "--kernel-source", kernel_build],
        env={k: v for k, v in full.items() if k != "HOST_ROOT"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    execs = [line for line in trace.read_text().splitlines() if " execve(" in line]
    ours = execs[0].split()[0]  # the tool itself: the first exec
    children = [line for line in execs if line.split()[0] != ours]
    programs = {line.split('"')[1].rsplit("/", 1)[-1] for line in children}
    assert {"make", "cc1", "ld"} <= programs, programs
    leaked = sorted({p for line in children if SECRET in line for p in [line.split('"')[1]]})
    assert leaked == []
    assert SECRET not in result.stderr
