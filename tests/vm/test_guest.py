"""Proves the QEMU guest harness: real kernel, exit codes, streams, shares,
module loading (explicit and on demand), the project's Python, and the CPUs: booted one,
the others online for the command, no kernel code patched when one comes online."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels import MODULES_DIR

from . import guest as guest_module
from .conftest import Guest
from .guest import (
    GUEST_MODULES,
    GuestError,
    GuestResult,
    GuestTimeout,
    _command_script,
    _module_name,
    available_kernels,
    guest_module_files,
    run_in_guest,
)
from .kernel_text import changes

KERNEL_TEXT = Path(__file__).with_name("kernel_text.py")

# --- no guest needed ---------------------------------------------------------


def test_available_kernels_have_image_and_modules() -> None:
    for kernel in available_kernels():
        assert Path(f"/boot/vmlinuz-{kernel}").is_file()
        assert Path(f"/lib/modules/{kernel}/modules.dep").is_file()


def assert_load_order(moddir: Path, files: list[Path]) -> list[str]:
    """Every module stage 1 needs is either built in or loaded, once, after everything
    it depends on (modules.dep); returns the names in load order."""
    graph = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        graph[_module_name(mod)] = [_module_name(d) for d in rest.split()]
    builtin = {_module_name(x) for x in (moddir / "modules.builtin").read_text().split()}
    names = [_module_name(f.name) for f in files]
    assert len(names) == len(set(names))
    for wanted in GUEST_MODULES:
        assert (wanted in names) != (wanted in builtin), wanted
    for i, name in enumerate(names):
        assert set(graph[name]) <= set(names[:i]), name
        assert name not in builtin
    return names


def test_guest_modules_come_after_their_dependencies(kernel: str) -> None:
    assert_load_order(MODULES_DIR / kernel, guest_module_files(kernel))


def _fake_modules(root: Path, release: str, dep: str, builtin: str) -> None:
    moddir = root / release
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(dep)
    (moddir / "modules.builtin").write_text(builtin)


# modules.dep and modules.builtin in the two shapes of Debian 12's kernels (README,
# "Kernels"): 6.1 has virtio as modules, 6.12 builds it in; 9p and overlay are
# modules in both, 9pnet needs netfs on 6.12.
SHAPES = {
    "modular-virtio": (
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko:\n"
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko"
        " kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko"
        " kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko"
        " kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko\n"
        "kernel/fs/overlayfs/overlay.ko:\n",
        "kernel/fs/ext4/ext4.ko\n",
        {
            "virtio_ring",
            "virtio",
            "virtio_pci_modern_dev",
            "virtio_pci",
            "virtio_console",
            "9pnet",
            "9pnet_virtio",
            "9p",
            "overlay",
        },
    ),
    "built-in-virtio": (
        "kernel/fs/netfs/netfs.ko.xz:\n"
        "kernel/net/9p/9pnet.ko.xz: kernel/fs/netfs/netfs.ko.xz\n"
        "kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n"
        "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n"
        "kernel/fs/overlayfs/overlay.ko.xz:\n",
        "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/char/virtio_console.ko\n",
        {"netfs", "9pnet", "9pnet_virtio", "9p", "overlay"},
    ),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_guest_module_files_of_built_in_and_modular_virtio(
    shape: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep, builtin, expected = SHAPES[shape]
    _fake_modules(tmp_path, "9.9.9-test", dep, builtin)
    monkeypatch.setattr(guest_module, "MODULES_DIR", tmp_path)
    files = guest_module_files("9.9.9-test")
    assert set(assert_load_order(tmp_path / "9.9.9-test", files)) == expected
    assert all(f.is_relative_to(tmp_path / "9.9.9-test" / "kernel") for f in files)


def test_a_guest_module_neither_built_in_nor_a_module_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep = SHAPES["built-in-virtio"][0]
    _fake_modules(tmp_path, "9.9.9-test", dep, "")  # virtio nowhere
    monkeypatch.setattr(guest_module, "MODULES_DIR", tmp_path)
    with pytest.raises(GuestError, match=r"virtio_pci of kernel 9\.9\.9-test"):
        guest_module_files("9.9.9-test")


def test_command_script_quotes_arguments_and_env() -> None:
    script = _command_script(["printf", "%s\n", "a b", "$HOME"], {"X": "it's"}, "/a dir")
    assert "export X='it'\"'\"'s'" in script
    assert "cd '/a dir' || exit 125" in script
    assert script.rstrip().endswith("exec printf '%s\n' 'a b' '$HOME'")
    with pytest.raises(ValueError):
        _command_script(["true"], {"BAD-NAME": "x"}, "/")


def test_changes_lists_each_changed_run_of_bytes() -> None:
    before = bytes(5000)
    after = bytearray(before)
    after[3:5] = b"\xeb\x05"
    after[4200] = 0x90
    assert changes(before, bytes(after)) == [(3, b"\0\0", b"\xeb\x05"), (4200, b"\0", b"\x90")]
    assert changes(before, before) == []


# --- booting a guest ---------------------------------------------------------


# One boot per kernel runs the command of every test below (a boot is most of each one's
# time under TCG): each part prints a marker line on both streams and its exit status,
# and each test reads its own part. The command as a whole exits 3.
ONE_BOOT = r"""
part() { echo "== $1"; echo "== $1" >&2; }
rc() { echo "rc=$?"; }
echo vmguest-kmsg-marker >/dev/kmsg
part uname; uname -r; rc
part env
cat from-host; echo "$GREETING" >from-guest; pwd; echo "pytest=${PYTEST_CURRENT_TEST:-unset}"
echo scratch >/etc/vmguest-scratch && cat /etc/vmguest-scratch; rc
part modprobe; modprobe dummy && grep '^dummy ' /proc/modules; rc
part loop
mkdir -p /mnt/img && mount -o loop,ro fs.img /mnt/img && cat /mnt/img/hello.txt &&
    grep -oE '^(loop|ext4) ' /proc/modules | sort && umount /mnt/img; rc
part python; "$PY" -c 'import nvdriver, sys; print(nvdriver.__file__); print(sys.prefix)'; rc
part cpus; nproc; cat /sys/devices/system/cpu/online /proc/cmdline; rc
part streams; echo to-out; echo to-err >&2; exit 3
"""


@dataclasses.dataclass(frozen=True)
class OneBoot:
    result: GuestResult
    share: Path

    def part(self, name: str, *, stream: str = "stdout") -> list[str]:
        """The lines of part `name` on `stream`, its `rc=` line last (stdout)."""
        lines = getattr(self.result, stream).splitlines()
        marker = f"== {name}"
        assert marker in lines, f"no part {name}:\n{self.result.stdout}\n{self.result.stderr}"
        after = lines[lines.index(marker) + 1 :]
        return list(itertools.takewhile(lambda line: not line.startswith("== "), after))

    def succeeded(self, name: str) -> list[str]:
        """The output of part `name`, which must have exited 0."""
        *output, rc = self.part(name)
        assert rc == "rc=0", (
            f"part {name}: {rc}\n{self.result.stderr}\n{self.result.console[-2000:]}"
        )
        return output


@pytest.fixture(scope="module")
def one_boot(guest_kernel: str, tmp_path_factory: pytest.TempPathFactory) -> OneBoot:
    share = tmp_path_factory.mktemp("one-boot")
    (share / "from-host").write_text("host data\n")
    content = share / "content"
    content.mkdir()
    (content / "hello.txt").write_text("inside ext4\n")
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    subprocess.run(
        [
            mkfs,
            "-q",
            "-F",
            "-T",
            "default",
            "-b",
            "4096",
            "-d",
            str(content),
            str(share / "fs.img"),
            "8M",
        ],
        check=True,
    )
    # The interpreter running pytest (the venv's), by absolute path: shims are slow.
    result = Guest(guest_kernel)(
        ["sh", "-c", ONE_BOOT],
        env={"GREETING": "hello from the guest", "PY": sys.executable},
        shares={str(share): share},
        cwd=str(share),
    )
    return OneBoot(result, share)


def test_guest_runs_the_booted_kernel(one_boot: OneBoot, guest: Guest) -> None:
    assert one_boot.succeeded("uname") == [guest.kernel]
    assert f"Linux version {guest.kernel}" in one_boot.result.console
    assert "vmguest-kmsg-marker" in one_boot.result.console


def test_exit_status_and_separate_streams(one_boot: OneBoot) -> None:
    assert one_boot.result.returncode == 3
    assert one_boot.part("streams") == ["to-out"]
    assert one_boot.part("streams", stream="stderr") == ["to-err"]
    assert one_boot.result.stdout.endswith("== streams\nto-out\n")
    assert one_boot.result.stderr.endswith("== streams\nto-err\n")


def test_env_cwd_and_rw_share(one_boot: OneBoot) -> None:
    assert one_boot.succeeded("env") == [
        "host data",
        str(one_boot.share),
        "pytest=unset",
        "scratch",
    ]
    assert (one_boot.share / "from-guest").read_text() == "hello from the guest\n"
    # The guest's root is an overlay: its writes never reach the host.
    assert not Path("/etc/vmguest-scratch").exists()


def test_modprobe_loads_a_real_module(one_boot: OneBoot) -> None:
    (line,) = one_boot.succeeded("modprobe")
    assert line.startswith("dummy ")


def test_loop_mount_autoloads_loop_and_ext4(one_boot: OneBoot) -> None:
    assert " ".join(one_boot.succeeded("loop")).split() == ["inside", "ext4", "ext4", "loop"]


def test_project_python_runs_in_the_guest(one_boot: OneBoot) -> None:
    import nvdriver

    assert one_boot.succeeded("python") == [nvdriver.__file__, sys.prefix]


def test_the_command_gets_the_cpus_brought_online_after_boot(one_boot: OneBoot) -> None:
    # The kernel boots one CPU, so that no initcall flips a static key while another vCPU
    # runs; init brings CPU 1 online after the last initcall ("Run /init"), before the command.
    nproc, online, cmdline = one_boot.succeeded("cpus")
    assert (nproc, online) == ("2", "0-1")
    console = one_boot.result.console
    booted_one = console.index("smp: Brought up 1 node, 1 CPU")
    init = console.index("Run /init as init process")
    cpu1 = console.index("smpboot: Booting Node 0 Processor 1 ")
    assert booted_one < init < cpu1 < console.index("vmguest: CPUs online: 0-1")
    assert "maxcpus=1" in cmdline.split()


def test_a_cpu_going_offline_and_online_patches_no_kernel_code(guest: Guest) -> None:
    # What guest.py KERNEL_COMMAND_LINE promises: the CPU hotplug that init does flips no
    # static key (patches no code while the vCPUs run). init's first bring-up of CPU 1 also
    # switches the lock prefixes to SMP code, which the kernel does before CPU 1 starts.
    result = guest([sys.executable, str(KERNEL_TEXT), "hotplug", "1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_timeout_kills_the_guest_and_reports_the_console(guest_kernel: str) -> None:
    with pytest.raises(GuestTimeout, match="console tail"):
        run_in_guest(["sleep", "600"], kernel=guest_kernel, timeout=3)
