"""Proves the QEMU guest harness: real kernel, exit codes, streams, shares,
module loading (explicit and on demand) and the project's Python."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Guest
from .guest import (
    GuestTimeout,
    _command_script,
    available_kernels,
    guest_module_files,
    run_in_guest,
)

# --- no guest needed ---------------------------------------------------------


def test_available_kernels_have_image_and_modules() -> None:
    for kernel in available_kernels():
        assert Path(f"/boot/vmlinuz-{kernel}").is_file()
        assert Path(f"/lib/modules/{kernel}/modules.dep").is_file()


def test_guest_modules_come_after_their_dependencies() -> None:
    kernels = available_kernels()
    if not kernels:
        pytest.skip("no kernel installed")
    files = guest_module_files(kernels[-1])
    names = [f.name.split(".ko")[0].replace("-", "_") for f in files]
    assert names.index("virtio") < names.index("virtio_pci")
    assert names.index("9pnet") < names.index("9pnet_virtio") < names.index("9p")
    assert "overlay" in names
    assert len(names) == len(set(names))


def test_command_script_quotes_arguments_and_env() -> None:
    script = _command_script(["printf", "%s\n", "a b", "$HOME"], {"X": "it's"}, "/a dir")
    assert "export X='it'\"'\"'s'" in script
    assert "cd '/a dir' || exit 125" in script
    assert script.rstrip().endswith("exec printf '%s\n' 'a b' '$HOME'")
    with pytest.raises(ValueError):
        _command_script(["true"], {"BAD-NAME": "x"}, "/")


# --- booting a guest ---------------------------------------------------------


def test_guest_runs_the_booted_kernel(guest: Guest) -> None:
    result = guest(["sh", "-c", "uname -r; echo vmguest-kmsg-marker >/dev/kmsg"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == guest.kernel
    assert f"Linux version {guest.kernel}" in result.console
    assert "vmguest-kmsg-marker" in result.console


def test_exit_status_and_separate_streams(guest: Guest) -> None:
    result = guest(["sh", "-c", "echo to-out; echo to-err >&2; exit 3"])
    assert result.returncode == 3
    assert result.stdout == "to-out\n"
    assert result.stderr == "to-err\n"


def test_env_cwd_and_rw_share(guest: Guest, tmp_path: Path) -> None:
    (tmp_path / "from-host").write_text("host data\n")
    script = (
        'cat from-host; echo "$GREETING" >from-guest; pwd; '
        'echo "pytest=${PYTEST_CURRENT_TEST:-unset}"; '
        "echo scratch >/etc/vmguest-scratch && cat /etc/vmguest-scratch"
    )
    result = guest(
        ["sh", "-c", script],
        env={"GREETING": "hello from the guest"},
        shares={str(tmp_path): tmp_path},
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "host data",
        str(tmp_path),
        "pytest=unset",
        "scratch",
    ]
    assert (tmp_path / "from-guest").read_text() == "hello from the guest\n"
    # The guest's root is an overlay: its writes never reach the host.
    assert not Path("/etc/vmguest-scratch").exists()


def test_modprobe_loads_a_real_module(guest: Guest) -> None:
    result = guest(["sh", "-c", "modprobe dummy && grep '^dummy ' /proc/modules"])
    assert result.returncode == 0, result.stderr + result.console[-2000:]
    assert result.stdout.startswith("dummy ")


def test_loop_mount_autoloads_loop_and_ext4(guest: Guest, tmp_path: Path) -> None:
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello.txt").write_text("inside ext4\n")
    image = tmp_path / "fs.img"
    subprocess.run(
        [mkfs, "-q", "-F", "-T", "default", "-b", "4096", "-d", str(content), str(image), "8M"],
        check=True,
    )
    script = (
        "mkdir -p /mnt/img && mount -o loop,ro fs.img /mnt/img && cat /mnt/img/hello.txt && "
        "grep -oE '^(loop|ext4) ' /proc/modules | sort && umount /mnt/img"
    )
    result = guest(["sh", "-c", script], shares={str(tmp_path): tmp_path}, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr + result.console[-2000:]
    assert result.stdout.split() == ["inside", "ext4", "ext4", "loop"]


def test_project_python_runs_in_the_guest(guest: Guest) -> None:
    # The interpreter running pytest (the venv's), by absolute path: shims are slow.
    code = "import nvdriver, sys; print(nvdriver.__file__); print(sys.prefix)"
    result = guest([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    import nvdriver

    assert result.stdout.splitlines() == [nvdriver.__file__, sys.prefix]


def test_timeout_kills_the_guest_and_reports_the_console(guest_kernel: str) -> None:
    with pytest.raises(GuestTimeout, match="console tail"):
        run_in_guest(["sleep", "600"], kernel=guest_kernel, timeout=3)
