"""NVSwitch systems: the fabric manager is started after the modules load, the fabric is up
before readiness, and the daemon is stopped first at shutdown.

No NVSwitch, GPU or NVLink can exist on this machine: the PCI devices are synthetic sysfs
entries with real device ids (tests/sysfs.py), and nv-fabricmanager, nvlsm, NVIDIA's
start script and the nvidia-smi that reports the fabric state are stand-ins
(tests/standin/fabric.py) that behave as NVIDIA's do where the product depends on it.
Everything else is the product's own code, the daemon handling and the wait included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nvdriver import cli, daemons, fabric, lifecycle, rootfs, status
from nvdriver.config import Config, Options
from nvdriver.errors import BusyError, DriverError, UnsupportedError, UsageError
from nvdriver.kmod import loading, unloading, users
from tests import sysfs
from tests.standin import fabric as standin

DRIVER_VERSION = "535.261.03"
# What nvidia-smi calls the GPUs (its bus ids) of an HGX H100 board.
H100_GPUS = {f"00000000:{n:02X}:00.0": "NVIDIA-H100-80GB-HBM3" for n in range(1, 9)}


@dataclasses.dataclass(frozen=True)
class Node:
    host: Path  # HOST_ROOT: this machine's /proc, a synthetic /sys
    root: Path  # CONTAINER_ROOT: the driver root with the stand-ins
    state: Path  # the stand-ins' directory (STANDIN_FABRIC_DIR)

    def config(self, **env: str) -> Config:
        return Config.from_env(
            {
                "HOST_ROOT": str(self.host),
                "CONTAINER_ROOT": str(self.root),
                "DRIVER_VERSION": DRIVER_VERSION,
                **env,
            }
        )

    def events(self) -> list[str]:
        return standin.events(self.state)

    def hgx_h100(self, **kwargs: Any) -> None:
        """8 H100 and 4 NVSwitches (LS10, 0x22a3) on the bus; the driver root's user space."""
        sysfs.gpus(self.host, *[sysfs.H100] * 8, driver="nvidia")
        sysfs.nvswitches(self.host, *[sysfs.NVSWITCH_H100] * 4)
        standin.driver_root(self.root, self.state, H100_GPUS, **kwargs)


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    host = tmp_path / "host"
    host.mkdir()
    (host / "proc").symlink_to("/proc")
    root = tmp_path / "root"
    run_dir = root / "var" / "run"
    pidfiles = {
        "FM_PID": run_dir / "nvidia-fabricmanager" / "nv-fabricmanager.pid",
        "NVLSM_PID": run_dir / "nvidia-fabricmanager" / "nvlsm.pid",
    }
    for name, path in pidfiles.items():
        monkeypatch.setattr(fabric, name, path)
    persistenced_pid = run_dir / "nvidia-persistenced" / "nvidia-persistenced.pid"
    monkeypatch.setattr(daemons, "PERSISTENCED_PID", persistenced_pid)
    monkeypatch.setattr(fabric, "POLL", 0.05)
    state = tmp_path / "standin"
    standin.configure(
        state,
        STANDIN_FM_PIDFILE=pidfiles["FM_PID"],
        STANDIN_NVLSM_PIDFILE=pidfiles["NVLSM_PID"],
        STANDIN_PERSISTENCED_PIDFILE=persistenced_pid,
    )
    yield Node(host, root, state)
    # Whatever a failing test left running goes (SIGKILL: no trap of the stand-ins).
    config = Config.from_env({"HOST_ROOT": str(host)})
    for pidfile in (*pidfiles.values(), persistenced_pid):
        if (pid := daemons.running_pid(config, pidfile)) is not None:
            os.kill(pid, signal.SIGKILL)


def written(node: Node) -> Path:
    """The config the fabric manager reads: on the container's own disk (CONTAINER_ROOT)."""
    return node.root / fabric.FM_CONFIG_WRITTEN.lstrip("/")


def alive(node: Node, pid: int) -> bool:
    return daemons._alive(node.config(), pid)


def started_pid(node: Node, pidfile: Path) -> int:
    pid = daemons.running_pid(node.config(), pidfile)
    assert pid is not None, f"no live process in {pidfile}"
    return pid


# --- without an NVLink fabric: nothing --------------------------------------------------


def test_without_nvswitches_the_fabric_manager_is_not_started(node: Node) -> None:
    """GPUs alone (a PCIe board): the driver root's fabric manager stays unused."""
    sysfs.gpus(node.host, sysfs.H100, sysfs.A100, driver="nvidia")
    standin.driver_root(node.root, node.state, H100_GPUS)
    with fabric.fabric_manager(node.config()) as found:
        assert found is None
    assert node.events() == []


def test_fabric_manager_off_starts_nothing_even_with_nvswitches(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    node.hgx_h100()
    with fabric.fabric_manager(node.config(FABRIC_MANAGER="off")) as found:
        assert found is None
    assert node.events() == []
    assert "FABRIC_MANAGER=off: not starting nv-fabricmanager" in caplog.text


def test_nvswitches_are_found_by_vendor_and_class() -> None:
    """0x10de with class 0x0680 is an NVSwitch whatever its device id; a GPU, another
    vendor's bridge of the same class, or an NVIDIA bridge of another class is not."""
    from nvdriver.host import PciDevice

    def device(vendor: int, pci_class: int, device: int = 0x22A3) -> PciDevice:
        return PciDevice("0000:80:00.0", vendor, device, pci_class)

    assert device(0x10DE, 0x068000).is_nvswitch
    assert device(0x10DE, 0x068000, sysfs.NVSWITCH_A100).is_nvswitch
    assert not device(0x10DE, 0x030200, sysfs.H100).is_nvswitch
    assert not device(0x8086, 0x068000).is_nvswitch
    assert not device(0x10DE, 0x060400, 0x22A8).is_nvswitch  # LS10's PCI-PCI bridge function


# --- with NVSwitches --------------------------------------------------------------------


def test_the_fabric_manager_starts_with_the_roots_config_rewritten_not_to_abort_cuda_jobs(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NVIDIA's config with ABORT_CUDA_JOBS_ON_FM_EXIT=0 (its 1 aborts running CUDA jobs
    when the daemon exits, on HGX A100), on the container's disk; the rest as shipped; and
    the block begins once the fabric is up."""
    standin.configure(node.state, STANDIN_FM_DELAY="0.6")
    node.hgx_h100()
    config = node.config()
    start = time.monotonic()
    with fabric.fabric_manager(config) as found:
        waited = time.monotonic() - start
        assert found is not None and len(found.nvswitches) == 4
        pid = started_pid(node, fabric.FM_PID)
        events = node.events()
        assert events[0] == f"nv-fabricmanager started: -c {written(node)}"
        shipped = (node.root / fabric.FM_CONFIG.lstrip("/")).read_text().splitlines()
        read = (node.state / "fabricmanager.cfg.read").read_text().splitlines()
        assert read == [
            "ABORT_CUDA_JOBS_ON_FM_EXIT=0" if line.startswith("ABORT_CUDA") else line
            for line in shipped
        ]
        assert "ABORT_CUDA_JOBS_ON_FM_EXIT=1" in shipped  # the image's file is untouched
        # The block began only once nvidia-smi showed the fabric up, having seen it not up.
        assert "nvidia-smi -q -x (fabric In Progress)" in events
        assert events[-1] == "nvidia-smi -q -x (fabric Completed)"
        assert waited >= 0.6
    assert not alive(node, pid)
    assert not fabric.FM_PID.exists()
    assert node.events()[-1] == "nv-fabricmanager stopped"


def test_operators_set_any_key_of_the_config_with_nvfm_config_variables(node: Node) -> None:
    """NVIDIA's driver container's names: NVFM_CONFIG_<KEY>=<value> replaces the key's line,
    or adds one where the file has none; ABORT_CUDA_JOBS_ON_FM_EXIT's wins over our 0."""
    node.hgx_h100()
    config = node.config(
        NVFM_CONFIG_ABORT_CUDA_JOBS_ON_FM_EXIT="1",
        NVFM_CONFIG_LOG_LEVEL="3",
        NVFM_CONFIG_FABRIC_MODE="0",
    )
    with fabric.fabric_manager(config):
        read = (node.state / "fabricmanager.cfg.read").read_text().splitlines()
    assert read[0] == "# NVIDIA Fabric Manager configuration file (stand-in)."
    assert [line for line in read if line.startswith(("ABORT_CUDA", "LOG_LEVEL"))] == [
        "LOG_LEVEL=3",
        "ABORT_CUDA_JOBS_ON_FM_EXIT=1",
    ]
    assert read[-1] == "FABRIC_MODE=0"


# What nvidia-smi calls the GPUs of an HGX A100 board: GPUs before Hopper, which report
# no fabric state.
A100_GPUS = {f"00000000:{n:02X}:00.0": "NVIDIA-A100-SXM4-80GB" for n in range(1, 9)}


def hgx_a100(node: Node) -> None:
    """8 A100 and 6 NVSwitches (LR10, 0x1af1); nvidia-smi's fabric state N/A throughout."""
    sysfs.gpus(node.host, *[sysfs.A100] * 8, driver="nvidia")
    sysfs.nvswitches(node.host, *[sysfs.NVSWITCH_A100] * 6)
    standin.driver_root(node.root, node.state, A100_GPUS)
    standin.configure(node.state, STANDIN_SMI_NO_FABRIC_STATE="1")


def test_on_hgx_a100_the_fabric_is_up_once_the_log_says_the_nvswitches_are_configured(
    node: Node,
) -> None:
    """The GPUs report no fabric state (N/A) whatever the fabric does: a running daemon is
    not enough; its log line "Successfully configured all the available NVSwitches" is."""
    standin.configure(node.state, STANDIN_FM_DELAY="0.6")
    hgx_a100(node)
    start = time.monotonic()
    with fabric.fabric_manager(node.config()):
        waited = time.monotonic() - start
        configured = b"Successfully configured all the available NVSwitches"
        assert configured in standin.fabric_log(node.state).read_bytes()
    assert waited >= 0.6
    assert "nvidia-smi -q -x (fabric N/A)" in node.events()


def test_an_earlier_runs_log_line_does_not_make_the_fabric_up(node: Node) -> None:
    """The log is appended to (LOG_APPEND_TO_LOG=1): only what this start wrote counts."""
    standin.configure(node.state, STANDIN_FM_NEVER_UP="1")
    hgx_a100(node)
    log_file = standin.fabric_log(node.state)
    log_file.write_text(
        "[Dec 05 2026 07:00:00] [INFO] [tid 1] Successfully configured all the available "
        "NVSwitches to route GPU NVLink traffic.\n"
    )
    with (
        pytest.raises(DriverError) as e,
        fabric.fabric_manager(node.config(FABRIC_MANAGER_TIMEOUT="1")),
    ):
        raise AssertionError("the block must not run: the fabric is not up")
    assert f"the fabric manager's log {log_file} does not say yet" in e.value.message
    assert daemons.running_pid(node.config(), fabric.FM_PID) is None


@pytest.mark.parametrize("setting", [{"LOG_LEVEL": "3"}, {"LOG_USE_SYSLOG": "1"}])
def test_a_config_that_keeps_the_line_out_of_the_log_waits_for_the_daemon_only(
    node: Node, caplog: pytest.LogCaptureFixture, setting: dict[str, str]
) -> None:
    """An operator's NVFM_CONFIG_LOG_LEVEL below INFO, or LOG_USE_SYSLOG=1: the line never
    reaches the file, so readiness does not wait for it (a warning says so) rather than
    running into the timeout on every start."""
    standin.configure(node.state, STANDIN_FM_NEVER_UP="1")
    hgx_a100(node)
    env = {f"NVFM_CONFIG_{k}": v for k, v in setting.items()}
    with fabric.fabric_manager(node.config(FABRIC_MANAGER_TIMEOUT="5", **env)):
        pass
    assert "keeps its INFO lines out of its log file" in caplog.text


def test_without_nvidia_modprobe_nvswitches_are_refused_naming_it(node: Node) -> None:
    """nv-fabricmanager runs nvidia-modprobe to make /dev/nvidia-nvswitch*: without it the
    fabric never comes up, so nothing starts, and the hint names its package."""
    node.hgx_h100(nvidia_modprobe=False)
    with pytest.raises(UnsupportedError) as e, fabric.fabric_manager(node.config()):
        pass
    assert e.value.exit_code == 6
    assert f"{node.root} has no nvidia-modprobe." in e.value.message
    hint = e.value.hint or ""
    assert hint.startswith("Install nvidia-modprobe (the package of that name;")
    assert "nvidia-fabricmanager" not in hint  # that one is there
    assert node.events() == []
    assert status.collect(node.config())["fabric_manager"]["missing"] == ["nvidia-modprobe"]


def test_a_fabric_that_never_comes_up_fails_after_the_timeout_and_nothing_is_left_running(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin.configure(node.state, STANDIN_FM_NEVER_UP="1")
    node.hgx_h100()
    pids: list[int] = []
    real_wait = fabric.wait_for_fabric

    def wait(config: Config, timeout: float, *args: Any) -> None:
        pids.append(started_pid(node, fabric.FM_PID))
        real_wait(config, timeout, *args)

    monkeypatch.setattr(fabric, "wait_for_fabric", wait)
    start = time.monotonic()
    with (
        pytest.raises(DriverError) as e,
        fabric.fabric_manager(node.config(FABRIC_MANAGER_TIMEOUT="1")),
    ):
        raise AssertionError("the block must not run: the fabric is not up")
    assert time.monotonic() - start < 10  # bounded: the 1 s timeout and the stop, not forever
    assert "The NVLink fabric is not up 1 s after nv-fabricmanager started" in e.value.message
    assert "00000000:01:00.0: In Progress" in e.value.message
    assert "FABRIC_MANAGER_TIMEOUT" in (e.value.hint or "")
    assert e.value.exit_code == 1
    assert pids and not alive(node, pids[0])
    assert node.events()[-1] == "nv-fabricmanager stopped"


def test_a_failed_registration_fails_at_once_naming_the_gpus(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin.configure(node.state, STANDIN_FM_DELAY="0")
    standin.configure(node.state, STANDIN_FM_STATUS="Unknown Error")
    node.hgx_h100()
    start = time.monotonic()
    with (
        pytest.raises(DriverError, match=r"00000000:08:00\.0: Completed \(Unknown Error\)"),
        fabric.fabric_manager(node.config(FABRIC_MANAGER_TIMEOUT="60")),
    ):
        pass
    assert time.monotonic() - start < 10
    assert daemons.running_pid(node.config(), fabric.FM_PID) is None


def test_a_fabric_manager_that_dies_fails_the_wait_at_once(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin.configure(node.state, STANDIN_FM_NEVER_UP="1")
    node.hgx_h100()
    real_states = fabric.fabric_states

    def states(smi: Path) -> tuple[list[fabric.GpuFabric] | None, str]:
        os.kill(started_pid(node, fabric.FM_PID), signal.SIGKILL)  # it crashes
        return real_states(smi)

    monkeypatch.setattr(fabric, "fabric_states", states)
    with (
        pytest.raises(DriverError, match=r"nv-fabricmanager is not running .* it exited before"),
        fabric.fabric_manager(node.config(FABRIC_MANAGER_TIMEOUT="60")),
    ):
        pass


def test_without_the_fabric_manager_nvswitches_are_refused_naming_the_package(
    node: Node,
) -> None:
    node.hgx_h100(fabric_manager=False)
    with pytest.raises(UnsupportedError) as e, fabric.fabric_manager(node.config()):
        pass
    assert e.value.exit_code == 6
    assert "0000:80:00.0 (PCI ID 10de:22a3)" in e.value.message
    assert f"{node.root} has no nv-fabricmanager and no {fabric.FM_CONFIG}" in e.value.message
    assert "nvidia-fabricmanager-535=535.261.03*" in (e.value.hint or "")
    assert node.events() == []


def test_a_fabric_manager_that_fails_to_start_fails_with_its_message(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What NVIDIA's prints where it cannot bring the fabric up (an NVLink5 board
    without nvlsm, the FM user guide): its message ends up in the error."""
    standin.configure(
        node.state, STANDIN_FM_FAIL_START="request to start FM failed: NV_WARN_NOTHING_TO_DO"
    )
    node.hgx_h100()
    with (
        pytest.raises(DriverError, match=r"nv-fabricmanager -c .* exited with status 1") as e,
        fabric.fabric_manager(node.config()),
    ):
        pass
    assert "NV_WARN_NOTHING_TO_DO" in e.value.message
    assert daemons.running_pid(node.config(), fabric.FM_PID) is None


@pytest.mark.parametrize(
    ("version", "package"),
    [
        ("535.261.03", "nvidia-fabricmanager-535"),
        ("570.172.08", "nvidia-fabricmanager-570"),
        ("580.82.07", "nvidia-fabricmanager"),
    ],
)
def test_the_package_named_is_the_one_nvidia_ships_for_the_branch(
    version: str, package: str
) -> None:
    """NVIDIA's CUDA repository: per-branch names before 580, one name from 580 on
    (gpu-driver-container's local-repo.sh)."""
    assert fabric.fm_package(version) == package


# --- NVLink5 ----------------------------------------------------------------------------


def nvlink5_board(node: Node, **kwargs: Any) -> None:
    """HGX B200: no NVSwitch on the host's bus; an InfiniBand port of a switch tray."""
    sysfs.nvlink5_tray(node.host)
    standin.driver_root(node.root, node.state, H100_GPUS, **kwargs)


def test_nvlink5_without_nvlsm_is_refused_naming_what_to_install(node: Node) -> None:
    nvlink5_board(node)
    sysfs.modules(node.host, *fabric.NVLINK5_MODULES)
    with pytest.raises(UnsupportedError) as e, fabric.fabric_manager(node.config()):
        pass
    assert "This is an NVLink5 system (InfiniBand mlx5_0 (NVLink5 switch tray))" in str(e.value)
    assert "has no nvlsm and no /usr/share/nvidia/nvlsm/nvlsm.conf and no" in e.value.message
    assert "nvlsm and infiniband-diags" in (e.value.hint or "")
    assert e.value.exit_code == 6
    assert node.events() == []


def test_nvlink5_without_its_infiniband_modules_fails_naming_them(node: Node) -> None:
    nvlink5_board(node, nvlink5=True)
    sysfs.modules(node.host, "mlx5_core")
    with (
        pytest.raises(DriverError, match="ib_umad that nvlsm reaches") as e,
        fabric.fabric_manager(node.config()),
    ):
        pass
    assert e.value.exit_code == 1
    assert node.events() == []


def test_nvlink5_starts_nvlsm_and_the_fabric_manager_through_nvidias_script_and_stops_both(
    node: Node,
) -> None:
    nvlink5_board(node, nvlink5=True)
    sysfs.modules(node.host, *fabric.NVLINK5_MODULES)
    with fabric.fabric_manager(node.config()) as found:
        assert found is not None and found.nvlink5 == ("mlx5_0",)
        fm, nvlsm = (started_pid(node, p) for p in (fabric.FM_PID, fabric.NVLSM_PID))
        root = node.root
        assert node.events()[0] == (
            f"nvidia-fabricmanager-start.sh --mode start "
            f"--fm-config-file {written(node)} "
            f"--fm-pid-file {fabric.FM_PID} "
            f"--nvlsm-config-file {root}/usr/share/nvidia/nvlsm/nvlsm.conf "
            f"--nvlsm-pid-file {fabric.NVLSM_PID}"
        )
    assert not alive(node, fm) and not alive(node, nvlsm)
    assert node.events()[-2:] == ["nv-fabricmanager stopped", "nvlsm stopped"]


# --- nvidia-smi's fabric state ----------------------------------------------------------

# The layout of `nvidia-smi -q -x` (its DTD nvsmi_device_v12.dtd: nvidia_smi_log/gpu with
# a `fabric` of `state` and `status`), cut to what is read: an A100 of an NVLink3 board
# reports no fabric state (N/A), an H100 its registration.
SMI_XML = """<?xml version="1.0" ?>
<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_v12.dtd">
<nvidia_smi_log>
  <driver_version>535.261.03</driver_version>
  <attached_gpus>3</attached_gpus>
  <gpu id="00000000:07:00.0"><product_name>NVIDIA A100-SXM4-80GB</product_name>
    <fabric><state>N/A</state><status>N/A</status></fabric></gpu>
  <gpu id="00000000:18:00.0"><product_name>NVIDIA H100 80GB HBM3</product_name>
    <fabric><state>Completed</state><status>Success</status></fabric></gpu>
  <gpu id="00000000:2A:00.0"><product_name>NVIDIA H100 80GB HBM3</product_name>
    <fabric><state>In Progress</state><status>N/A</status></fabric></gpu>
</nvidia_smi_log>
"""


def test_the_fabric_state_is_read_from_nvidia_smis_xml() -> None:
    states = fabric.parse_fabric_states(SMI_XML)
    assert [(s.gpu, s.state, s.up) for s in states] == [
        ("00000000:07:00.0", "N/A", True),  # nothing to register: up once the daemon runs
        ("00000000:18:00.0", "Completed", True),
        ("00000000:2A:00.0", "In Progress", False),
    ]
    assert not any(s.failed for s in states)


# --- status -----------------------------------------------------------------------------


def test_status_shows_the_nvswitches_the_daemon_and_what_is_missing(node: Node) -> None:
    nvlink5_board(node)  # the fabric manager, not nvlsm
    sysfs.nvswitches(node.host, sysfs.NVSWITCH_H100)
    report = status.collect(node.config())["fabric_manager"]
    assert report == {
        "mode": "auto",
        "nvswitches": [
            {"address": "0000:80:00.0", "device": "0x22a3", "driver": "nvidia-nvswitch"}
        ],
        "pid": None,
        "missing": [],
        "nvlink5": ["mlx5_0"],
        "nvlsm": {
            "needed": True,
            "pid": None,
            "missing": [
                "nvlsm",
                fabric.NVLSM_CONFIG,
                fabric.FM_START_SCRIPT,
                "mlx5_core",
                "ib_umad",
            ],
        },
    }
    assert "fabric:" in status.render(status.collect(node.config()))
    json.dumps(report)


# --- the lifecycle: init, load, unload --------------------------------------------------
# Loading kernel modules cannot happen here (no CAP_SYS_MODULE; tests/vm does it in a
# guest): finding the package and loading are replaced by steps that write "modules
# loaded"/"modules unloaded" into the stand-ins' event log. Everything after them is real.


@pytest.fixture
def without_modules(node: Node, monkeypatch: pytest.MonkeyPatch) -> Node:
    events = node.state / "events"

    def note(line: str) -> None:
        with events.open("a") as f:
            f.write(line + "\n")

    @contextlib.contextmanager
    def driver_loaded(*args: object) -> Iterator[list[str]]:
        note("modules loaded")
        try:
            yield ["nvidia"]
        except BusyError:  # as the real one (test_a_driver_in_use_at_shutdown_stays_loaded)
            raise
        except BaseException:  # as the real one: a failure unloads what it loaded
            note("modules unloaded")
            raise
        note("modules unloaded")

    def load(*args: object) -> list[str]:
        note("modules loaded")
        return ["nvidia"]

    plan = types.SimpleNamespace(tree=None, modules=(), params={}, version="x", flavour="open")
    monkeypatch.setattr(lifecycle, "_prepare", lambda config, **_: plan)
    monkeypatch.setattr(lifecycle, "_adopt_or_prepare", lambda config: (plan, False))
    monkeypatch.setattr(lifecycle, "_stamp_loaded", lambda config, plan: None)
    monkeypatch.setattr(rootfs, "exposed_root", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(loading, "driver_loaded", driver_loaded)
    monkeypatch.setattr(loading, "load", load)
    # A stand-in nvidia-persistenced on PATH (the daemon needs a GPU).
    bin_dir = node.root.parent / "bin"
    standin.persistenced(bin_dir / "nvidia-persistenced", node.state)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    env = {"HOST_ROOT": node.host, "CONTAINER_ROOT": node.root, "DRIVER_VERSION": DRIVER_VERSION}
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    node.hgx_h100()
    return node


@pytest.fixture
def signal_handlers() -> Iterator[None]:
    """cli.main installs init's handlers; they go when the test does."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@contextlib.contextmanager
def stopped_when_ready(
    node: Node,
    within: float = 30,
    note: Callable[[], list[str]] = list,
    look: Callable[[], object] = lambda: None,
) -> Iterator[list[list[str]]]:
    """SIGTERM to us once the readiness file is there, noting the events at that moment
    (the list yielded gets them, then what `note` says) and calling `look` while all runs;
    after `within` seconds in any case (an init that waits wrongly then fails rather than
    hangs); nothing once the block is left."""
    ready = node.host / rootfs.READY_FILE.lstrip("/")
    seen: list[list[str]] = []
    done = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + within
        while not done.wait(0.01):
            if ready.exists() or time.monotonic() > deadline:
                seen.append(node.events() + (["ready", *note()] if ready.exists() else []))
                look()
                # init writes the file, logs, then waits: a SIGTERM in between is a failed
                # start (exit 1), not the shutdown under test.
                if not done.wait(0.3):
                    os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()


def test_init_starts_fabric_manager_after_persistenced_readies_after_fabric_and_stops_it_first(
    without_modules: Node, signal_handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = without_modules
    standin.configure(node.state, STANDIN_FM_DELAY="0.5")
    with stopped_when_ready(node) as seen:
        assert cli.main(["init"]) == 0
    at_ready, events = seen[0][:-1], node.events()
    assert seen[0][-1] == "ready"
    order = [e for e in events if not e.startswith("nvidia-smi -q -x")]
    assert order == [
        "modules loaded",
        "nvidia-persistenced started: --persistence-mode",
        f"nv-fabricmanager started: -c {written(node)}",
        "nvidia-smi (fabric Completed)",  # the readiness check, once the fabric is up
        "nv-fabricmanager stopped",  # at shutdown: first
        "nvidia-persistenced stopped",
        "modules unloaded",
    ]
    # Readiness came after the fabric was up, and the wait saw it not up before.
    assert at_ready[-1] == "nvidia-smi (fabric Completed)"
    assert "nvidia-smi -q -x (fabric In Progress)" in at_ready
    assert not (node.host / rootfs.READY_FILE.lstrip("/")).exists()


def test_init_says_daemons_not_ready_until_persistenced_and_the_fabric_run_and_removes_it(
    without_modules: Node, signal_handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU Operator's startup probe holds the pod back while .driver-daemons-status is
    there and not `Ready`; the readiness file is YAML, as its validator reads it."""
    node = without_modules
    status_file = node.host / rootfs.DAEMONS_STATUS_FILE.lstrip("/")
    ready_file = node.host / rootfs.READY_FILE.lstrip("/")

    def noting_status(program: Path) -> None:
        """`program` wrapped: it notes the daemons' status in the events, then runs."""
        real = program.with_name(program.name + ".real")
        program.rename(real)
        standin._program(
            program,
            f'#!/bin/sh\necho "{program.name} sees $(cat {status_file} || echo no file)" '
            f'>>"{node.state}/events"\nexec {real} "$@"\n',
            node.state,
        )

    noting_status(Path(shutil.which("nvidia-persistenced") or "nvidia-persistenced"))
    noting_status(node.root / "usr/bin/nv-fabricmanager")

    def at_ready() -> list[str]:
        """The daemons' status and the readiness file as the Operator reads it (never
        raising: the watcher must go on to stop init)."""
        status = status_file.read_text() if status_file.exists() else "no status file"
        try:
            features = json.dumps(yaml.safe_load(ready_file.read_text()), sort_keys=True)
        except (OSError, yaml.YAMLError) as e:
            features = repr(e)
        return [status, features]

    with stopped_when_ready(node, note=at_ready) as seen:
        assert cli.main(["init"]) == 0
    assert [e for e in seen[0] if not e.startswith("nvidia-smi -q -x")] == [
        "modules loaded",
        "nvidia-persistenced sees NotReady",
        "nvidia-persistenced started: --persistence-mode",
        "nv-fabricmanager sees NotReady",
        f"nv-fabricmanager started: -c {written(node)}",
        "nvidia-smi (fabric Completed)",
        "ready",
        "Ready",
        json.dumps(
            {"GDRCOPY_ENABLED": False, "GDS_ENABLED": False, "GPU_DIRECT_RDMA_ENABLED": False}
        ),
    ]
    assert node.events()[-1] == "modules unloaded"
    assert not status_file.exists() and not ready_file.exists()
    assert list(status_file.parent.iterdir()) == []  # no temporary file either


SECRET = "s3cret-of-the-registry"


def test_the_daemons_get_none_of_our_secrets(
    without_modules: Node, signal_handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """init with the registry's credentials in its environment: nvidia-persistenced and the
    fabric manager run with the minimal environment (their /proc/PID/environ; the stand-ins
    are shell scripts, and a shell exports PWD)."""
    node = without_modules
    monkeypatch.setenv("PRECOMPILED_REGISTRY_PASSWORD", SECRET)
    monkeypatch.setenv("PRECOMPILED_REGISTRY_USERNAME", "fleet")
    seen: dict[str, bytes] = {}

    def look() -> None:
        for pidfile in (daemons.PERSISTENCED_PID, fabric.FM_PID):
            seen[pidfile.name] = Path("/proc", pidfile.read_text().strip(), "environ").read_bytes()

    with stopped_when_ready(node, look=look):
        assert cli.main(["init"]) == 0
    assert sorted(seen) == ["nv-fabricmanager.pid", "nvidia-persistenced.pid"]
    for environ in seen.values():
        names = {entry.partition(b"=")[0] for entry in environ.split(b"\0") if entry}
        assert names - {b"PWD"} == {b"PATH", b"LC_ALL"}
        assert SECRET.encode() not in environ


def test_init_whose_fabric_never_comes_up_exits_1_announcing_nothing_and_stopping_all(
    without_modules: Node, signal_handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = without_modules
    standin.configure(node.state, STANDIN_FM_NEVER_UP="1")
    monkeypatch.setenv("FABRIC_MANAGER_TIMEOUT", "1")
    with stopped_when_ready(node, within=20) as seen:
        assert cli.main(["init"]) == 1
    assert seen == []  # it failed by itself, never announced ready
    events = [e for e in node.events() if not e.startswith("nvidia-smi -q -x")]
    assert events[-3:] == [
        "nv-fabricmanager stopped",
        "nvidia-persistenced stopped",
        "modules unloaded",
    ]
    assert "nvidia-smi (fabric" not in " ".join(events)  # never announced
    assert not (node.host / rootfs.READY_FILE.lstrip("/")).exists()
    assert not (node.host / rootfs.DAEMONS_STATUS_FILE.lstrip("/")).exists()
    config = node.config()
    assert daemons.running_pid(config, fabric.FM_PID) is None
    assert daemons.running_pid(config, daemons.PERSISTENCED_PID) is None


def test_load_leaves_the_fabric_manager_running_and_unload_stops_it_before_persistenced(
    without_modules: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = without_modules
    config = node.config()
    lifecycle.load(config)
    pid = started_pid(node, fabric.FM_PID)
    assert node.events()[-1] == "nvidia-smi -q -x (fabric Completed)"
    # persistenced as a restarted init would have left it, to see the order at unload
    daemons.start_persistenced(config)
    status_file = node.host / rootfs.DAEMONS_STATUS_FILE.lstrip("/")
    status_file.parent.mkdir(parents=True)
    status_file.write_text("Ready")  # and its daemons' status: they are stopped now
    lifecycle.unload(config)
    assert not alive(node, pid)
    assert not status_file.exists()
    stops = [e for e in node.events() if e.endswith("stopped")]
    assert stops == ["nv-fabricmanager stopped", "nvidia-persistenced stopped"]


def loaded_driver(node: Node, refcnt: int) -> None:
    """nvidia.ko as /sys/module shows it, with `refcnt` references (no driver loads here)."""
    module = node.host / "sys/module/nvidia"
    module.mkdir(parents=True, exist_ok=True)
    (module / "refcnt").write_text(f"{refcnt}\n")


def daemons_hold_devices(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in daemons hold devices open as the real ones hold /dev/nvidia* (files in
    a directory of the test's, users.DEVICE_PREFIX: no NVIDIA device can exist here):
    nvidia-persistenced 2 of nvidia.ko's, the fabric manager 3. Each daemon's `sleep`
    children inherit them, as a fork does."""
    dev = node.root.parent / "dev"
    dev.mkdir()
    for name in ("nvidiactl", "nvidia0", "nvidia-nvswitchctl", "nvidia-nvswitch0"):
        (dev / name).touch()
    monkeypatch.setattr(users, "DEVICE_PREFIX", f"{dev}/nvidia")
    standin.configure(
        node.state,
        STANDIN_PERSISTENCED_OPENS=f"{dev}/nvidiactl {dev}/nvidia0",
        STANDIN_FM_OPENS=f"{dev}/nvidiactl {dev}/nvidia-nvswitchctl {dev}/nvidia-nvswitch0",
    )


@pytest.mark.parametrize(
    ("job", "busy"),
    [(None, None), ("visible", "pid "), ("hidden", "2 reference(s) that no process here shows")],
    ids=["daemons-only", "a-job", "a-job-this-container-cannot-see"],
)
def test_unload_looks_for_users_before_it_stops_the_fabric_manager(
    without_modules: Node, monkeypatch: pytest.MonkeyPatch, job: str | None, busy: str | None
) -> None:
    """The daemons' own open devices (two references per file, as the kernel counts
    NVIDIA's: chrdev_open takes the cdev's owner and the file operations') are not users of
    the driver; a CUDA job is, seen with /dev/nvidia0 open or as references on nvidia-uvm,
    none of whose files is open here: exit 3 with the fabric manager and persistenced left
    running (stopping the fabric manager aborts that job on HGX A100, NVIDIA's
    ABORT_CUDA_JOBS_ON_FM_EXIT=1). rmmod cannot run here: the modules' unload is replaced,
    after the check."""
    node = without_modules
    daemons_hold_devices(node, monkeypatch)
    unloaded: list[str] = []
    monkeypatch.setattr(unloading, "unload", lambda config: unloaded.append("nvidia"))
    config = node.config()
    lifecycle.load(config)
    daemons.start_persistenced(config)
    fm, persistenced = started_pid(node, fabric.FM_PID), started_pid(node, daemons.PERSISTENCED_PID)
    loaded_driver(node, 2 * 5)
    with contextlib.ExitStack() as stack:
        if job == "visible":
            # Not our child (a child of ours would share our files): its shell exits at once.
            device = users.DEVICE_PREFIX + "0"
            script = f"(exec 3<{device}; echo $BASHPID; exec sleep 60 >/dev/null) &"
            out = subprocess.run(["bash", "-c", script], stdout=subprocess.PIPE, check=True)
            cuda = int(out.stdout)
            stack.callback(os.kill, cuda, signal.SIGKILL)
            loaded_driver(node, 2 * 6)
            busy = f"pid {cuda} (sleep)"
        elif job == "hidden":
            module = node.host / "sys/module/nvidia_uvm"
            module.mkdir(parents=True)
            (module / "refcnt").write_text("2\n")
        if busy is not None:
            with pytest.raises(BusyError) as e:
                lifecycle.unload(config)
            assert e.value.exit_code == 3
            assert "is in use, nothing was stopped or unloaded" in e.value.message
            assert busy in e.value.message, e.value.message
            assert alive(node, fm) and alive(node, persistenced)
            assert not [e for e in node.events() if e.endswith("stopped")]
            assert unloaded == []
        else:
            lifecycle.unload(config)
            stops = [e for e in node.events() if e.endswith("stopped")]
            assert stops == ["nv-fabricmanager stopped", "nvidia-persistenced stopped"]
            assert unloaded == ["nvidia"]


def test_init_whose_driver_is_in_use_at_shutdown_exits_3_and_leaves_its_daemons_running(
    without_modules: Node, signal_handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA job opens the driver while init runs; at SIGTERM init checks for users
    before any daemon stops: exit 3, the fabric manager, persistenced and the modules as
    they were; readiness and the daemons' status gone (this container no longer runs)."""
    node = without_modules
    pids: list[int] = []

    def job_starts() -> None:
        loaded_driver(node, 1)
        pids.extend(started_pid(node, p) for p in (fabric.FM_PID, daemons.PERSISTENCED_PID))

    with stopped_when_ready(node, look=job_starts) as seen:
        assert cli.main(["init"]) == 3
    assert seen and len(pids) == 2
    assert all(alive(node, pid) for pid in pids), node.events()
    events = node.events()
    assert not [e for e in events if e.endswith("stopped")]
    assert "modules unloaded" not in events
    assert not (node.host / rootfs.READY_FILE.lstrip("/")).exists()
    assert not (node.host / rootfs.DAEMONS_STATUS_FILE.lstrip("/")).exists()


def test_a_driver_in_use_at_shutdown_stays_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real driver_loaded lets the shutdown's BusyError through with nothing undone;
    any other failure unloads what its block loaded. Loading and rmmod cannot run here:
    both are replaced by notes."""
    done: list[str] = []

    def load(*args: object) -> list[str]:
        done.append("load")
        return ["nvidia"]

    monkeypatch.setattr(loading, "load", load)
    monkeypatch.setattr(loading, "unload_new", lambda *args: done.append("unload_new"))
    monkeypatch.setattr(loading, "unload", lambda *args: done.append("unload"))
    config = Config.from_env({"HOST_ROOT": str(tmp_path)})
    tree: Any = None
    with pytest.raises(BusyError), loading.driver_loaded(config, tree, ["nvidia"], {}):
        raise BusyError("The NVIDIA driver is in use")
    assert done == ["load"]
    with pytest.raises(DriverError), loading.driver_loaded(config, tree, ["nvidia"], {}):
        raise DriverError("the fabric did not come up")
    assert done == ["load", "load", "unload_new"]


# --- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FABRIC_MANAGER": "on"}, "FABRIC_MANAGER='on' is not valid: expected one of auto, off"),
        ({"FABRIC_MANAGER_TIMEOUT": "soon"}, "FABRIC_MANAGER_TIMEOUT='soon' is not valid"),
        ({"FABRIC_MANAGER_TIMEOUT": "-5"}, "expected a positive number of seconds"),
        ({"FABRIC_MANAGER_TIMEOUT": "inf"}, "expected a positive number of seconds"),
        ({"NVFM_CONFIG_": "1"}, "NVFM_CONFIG_ is not a fabric manager setting"),
        (
            {"NVFM_CONFIG_LOG_LEVEL": "4\nDAEMONIZE=0"},
            "NVFM_CONFIG_LOG_LEVEL is not a fabric manager setting",
        ),
    ],
)
def test_bad_fabric_manager_settings_are_usage_errors(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=re.escape(message)) as e:
        Options.from_env(dict(os.environ))
    assert e.value.exit_code == 2
    assert Options.from_env({"FABRIC_MANAGER_TIMEOUT": "90"}).fabric_manager_timeout == 90
