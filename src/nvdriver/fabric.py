"""NVIDIA Fabric Manager on NVSwitch systems: the NVLink fabric up before readiness.

On an HGX/DGX board the GPUs reach each other through NVSwitches. Until
`nv-fabricmanager` has trained the NVLinks and registered every GPU with the
fabric, CUDA fails with cudaErrorSystemNotReady; a driver announced ready before
that hands the Operator a node whose GPUs do not work. So, where NVSwitches are
(PCI vendor 0x10de, class 0x0680), the driver root's fabric manager is started
after the modules load with its config from the driver root, readiness waits
(bounded) for `nvidia-smi -q -x` to show each GPU's fabric state "Completed", and
the daemon is stopped before the modules unload (it holds the NVSwitch devices).

Its config is NVIDIA's `fabricmanager.cfg` from the driver root, rewritten at each start
onto the container's own disk with ABORT_CUDA_JOBS_ON_FM_EXIT=0 (so that a fabric
manager that exits, a restarted container's, does not abort running CUDA jobs on HGX
A100) and the operator's NVFM_CONFIG_<KEY> settings. GPUs before Hopper report no fabric
state: there the fabric is up once the daemon's log says it configured the NVSwitches.

NVLink5 systems (HGX/DGX B200 and later) have no NVSwitch on the host's PCI bus:
the switches are programmed through InfiniBand ports of the switch trays (their
VPD says SW_MNG) by NVIDIA's NVLink Subnet Manager, `nvlsm`, which
`nvidia-fabricmanager-start.sh` starts with the fabric manager. Without it the
fabric manager cannot initialise the fabric, so a missing nvlsm is an error,
before anything starts. The facts and their sources: docs/fabric-manager.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from nvdriver import daemons, rootfs
from nvdriver.atomic import write_atomically
from nvdriver.config import Config
from nvdriver.daemons import Daemon
from nvdriver.errors import DriverError, UnsupportedError
from nvdriver.host import PciDevice, nvswitches
from nvdriver.run import run

log = logging.getLogger(__name__)

FABRIC_MANAGER = "nv-fabricmanager"
# In the driver root, where NVIDIA's nvidia-fabricmanager package puts it.
FM_CONFIG = "/usr/share/nvidia/nvswitch/fabricmanager.cfg"
# What the daemon reads (`-c`): that file with our defaults and the operator's settings,
# written at each start on the container's own disk (Config.own).
FM_CONFIG_WRITTEN = "/etc/nvidia-fabricmanager/fabricmanager.cfg"
# Keys of fabricmanager.cfg set unless the operator sets them (NVFM_CONFIG_<KEY>): a fabric
# manager that exits must not abort running CUDA jobs (NVIDIA's default 1 does on HGX A100).
FM_DEFAULTS = (("ABORT_CUDA_JOBS_ON_FM_EXIT", "0"),)
# The daemon opens /dev/nvidia-nvswitch* through it (docs/fabric-manager.md).
NVIDIA_MODPROBE = "nvidia-modprobe"
# What the fabric manager logs once its NVSwitches route NVLink traffic (NVSwitch gen 2/3).
NVSWITCHES_CONFIGURED = b"Successfully configured all the available NVSwitches"
DEFAULT_LOG = "/var/log/fabricmanager.log"  # its default LOG_FILE_NAME
# Where the daemons write their pid files: their own fixed paths in the container's file
# system (as PERSISTENCED_PID; NVIDIA's container reads the same). Tests patch them.
FM_PID = Path("/var/run/nvidia-fabricmanager/nv-fabricmanager.pid")
NVLSM = "nvlsm"
NVLSM_CONFIG = "/usr/share/nvidia/nvlsm/nvlsm.conf"
NVLSM_PID = Path("/var/run/nvidia-fabricmanager/nvlsm.pid")
FM_START_SCRIPT = "nvidia-fabricmanager-start.sh"
# The InfiniBand stack nvlsm talks to the switch trays through (NVIDIA's container waits
# for both before it starts the fabric manager on NVLink5).
NVLINK5_MODULES = ("mlx5_core", "ib_umad")
NVLINK5_VPD_MARK = b"SW_MNG"

# nvidia-smi's fabric states (nvsmi_device_v12.dtd: gpu/fabric/state, gpu/fabric/status).
UP_STATE, UP_STATUS = "Completed", "Success"
# A GPU that has no fabric registration to report (before Hopper): its fabric is the
# daemon's alone, up once it runs.
UNREPORTED_STATES = ("N/A", "Not Supported")
SMI_TIMEOUT = 60.0
POLL = 2.0  # seconds between two looks at the fabric state; tests patch it


def fm_package(driver_version: str | None) -> str:
    """The package NVIDIA ships the fabric manager of a driver version in (its CUDA
    repository): nvidia-fabricmanager from branch 580, nvidia-fabricmanager-BRANCH before."""
    branch = (driver_version or "").partition(".")[0]
    if branch.isdigit() and int(branch) < 580:
        return f"nvidia-fabricmanager-{branch}"
    return "nvidia-fabricmanager"


def _fm_package_hint(driver_version: str | None, missing: list[str]) -> str:
    version = f"={driver_version}*" if driver_version else " of the driver's version"
    packages = []
    if set(missing) - {NVIDIA_MODPROBE}:
        packages.append(f"NVIDIA's {fm_package(driver_version)}{version}")
    if NVIDIA_MODPROBE in missing:
        packages.append(
            "nvidia-modprobe (the package of that name; the driver's .run installs it "
            "unless given --no-nvidia-modprobe)"
        )
    return (
        f"Install {' and '.join(packages)} from NVIDIA's CUDA repository into the image, as "
        "NVIDIA's driver container does; or set FABRIC_MANAGER=off if the host runs its own "
        "fabric manager."
    )


NVLSM_PACKAGE_HINT = (
    "Install NVIDIA's nvlsm and infiniband-diags packages (NVIDIA's CUDA repository) into "
    "the image beside nvidia-fabricmanager of this driver version, as NVIDIA's driver "
    "container does for NVLink5 systems."
)


def _fm() -> Daemon:
    return Daemon(FABRIC_MANAGER, FM_PID)  # read at each call: tests patch the paths


def _nvlsm() -> Daemon:
    return Daemon(NVLSM, NVLSM_PID)


def fabric_daemons() -> tuple[Daemon, ...]:
    """The fabric manager and nvlsm, as `stop` stops them."""
    return (_fm(), _nvlsm())


def nvlink5_ports(config: Config) -> tuple[str, ...]:
    """The InfiniBand devices of NVLink5 switch trays: their PCI VPD holds SW_MNG (NVIDIA's
    driver container greps /sys/class/infiniband/*/device/vpd for it)."""
    root = config.host("/sys/class/infiniband")
    found = []
    for dev in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            vpd = (dev / "device" / "vpd").read_bytes()
        except OSError:
            continue
        if NVLINK5_VPD_MARK in vpd:
            found.append(dev.name)
    return tuple(found)


class Fabric(NamedTuple):
    """What the node's NVLink fabric needs: its NVSwitches, and whether it is NVLink5; with
    what the driver root has of the fabric manager (None where it lacks a file)."""

    nvswitches: tuple[PciDevice, ...]
    nvlink5: tuple[str, ...]
    binary: Path | None
    config_file: Path | None
    modprobe: Path | None
    start_script: Path | None
    nvlsm: Path | None
    nvlsm_config: Path | None
    modules_missing: tuple[str, ...]

    @classmethod
    def detect(cls, config: Config) -> Fabric:
        root = config.options.container_root
        ib = nvlink5_ports(config)

        def file(path: str) -> Path | None:
            found = root / Path(path).relative_to("/")
            return found if found.is_file() else None

        return cls(
            nvswitches=tuple(nvswitches(config)),
            nvlink5=ib,
            binary=rootfs.find_program(root, FABRIC_MANAGER),
            config_file=file(FM_CONFIG),
            modprobe=rootfs.find_program(root, NVIDIA_MODPROBE),
            start_script=rootfs.find_program(root, FM_START_SCRIPT) if ib else None,
            nvlsm=rootfs.find_program(root, NVLSM) if ib else None,
            nvlsm_config=file(NVLSM_CONFIG) if ib else None,
            modules_missing=tuple(
                m for m in NVLINK5_MODULES if ib and not config.host(f"/sys/module/{m}").is_dir()
            ),
        )

    @property
    def present(self) -> bool:
        """Whether this node has an NVLink fabric for the fabric manager to bring up."""
        return bool(self.nvswitches or self.nvlink5)

    def devices(self) -> str:
        switches = [str(d) for d in self.nvswitches]
        trays = [f"InfiniBand {p} (NVLink5 switch tray)" for p in self.nvlink5]
        return ", ".join(switches + trays)

    def fm_missing(self) -> list[str]:
        """What the driver root lacks of the fabric manager itself; with NVSwitches on the
        bus, nvidia-modprobe too (it makes /dev/nvidia-nvswitch* for the daemon)."""
        wanted = [(FABRIC_MANAGER, self.binary), (FM_CONFIG, self.config_file)]
        if self.nvswitches:
            wanted.append((NVIDIA_MODPROBE, self.modprobe))
        return [name for name, path in wanted if path is None]

    def nvlsm_missing(self) -> list[str]:
        """What the driver root lacks of NVLink5's subnet manager (nothing off NVLink5)."""
        if not self.nvlink5:
            return []
        wanted = [
            (NVLSM, self.nvlsm),
            (NVLSM_CONFIG, self.nvlsm_config),
            (FM_START_SCRIPT, self.start_script),
        ]
        return [name for name, path in wanted if path is None]

    def check(self, config: Config) -> None:
        """Refuse (exit 6) a fabric this driver root cannot bring up, naming what to
        install; refuse (exit 1) NVLink5 without its InfiniBand modules loaded."""
        root = config.options.container_root
        if missing := self.fm_missing():
            raise UnsupportedError(
                f"This node has an NVLink fabric ({self.devices()}), which needs NVIDIA "
                f"Fabric Manager, and the driver root {root} has no {' and no '.join(missing)}.",
                hint=_fm_package_hint(config.driver_version, missing),
            )
        if missing := self.nvlsm_missing():
            raise UnsupportedError(
                f"This is an NVLink5 system ({self.devices()}): its fabric manager needs "
                f"NVIDIA's NVLink Subnet Manager, and the driver root {root} has no "
                f"{' and no '.join(missing)}. Without it the GPUs never register with the "
                "fabric and CUDA fails with cudaErrorSystemNotReady.",
                hint=NVLSM_PACKAGE_HINT,
            )
        if self.modules_missing:
            raise DriverError(
                f"This is an NVLink5 system ({self.devices()}), and the kernel modules "
                f"{', '.join(self.modules_missing)} that nvlsm reaches its switch trays "
                "through are not loaded.",
                hint="Load them before the driver starts (NVIDIA's Network Operator or "
                "MLNX_OFED does); the driver container's restart then finds them.",
            )

    def start_argv(self, config_file: Path) -> list[str | Path]:
        """NVLink5: NVIDIA's start script, which starts nvlsm and then the fabric manager
        (the flags of NVIDIA's driver container); otherwise the fabric manager itself,
        `-c` its config (it forks into the background: DAEMONIZE=1, its default)."""
        assert self.binary is not None  # check() passed
        if not self.nvlink5:
            return [self.binary, "-c", config_file]
        assert self.start_script is not None and self.nvlsm_config is not None
        return [
            self.start_script,
            "--mode",
            "start",
            "--fm-config-file",
            config_file,
            "--fm-pid-file",
            FM_PID,
            "--nvlsm-config-file",
            self.nvlsm_config,
            "--nvlsm-pid-file",
            NVLSM_PID,
        ]


def configured(text: str, settings: Sequence[tuple[str, str]]) -> str:
    """fabricmanager.cfg's `text` with each KEY=value of `settings` set: its line replaced
    where the file has one (comments and the other keys kept), else appended (what NVIDIA's
    driver container does with NVFM_CONFIG_<KEY>)."""
    lines = text.splitlines()
    for key, value in settings:
        at = [i for i, line in enumerate(lines) if line.startswith(f"{key}=")]
        for i in at:
            lines[i] = f"{key}={value}"
        if not at:
            lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


def config_value(text: str, key: str) -> str | None:
    """The value of `key` in fabricmanager.cfg's `text` (its last KEY= line), if any."""
    values = [line.partition("=")[2] for line in text.splitlines() if line.startswith(f"{key}=")]
    return values[-1].strip() if values else None


class FabricLog(NamedTuple):
    """The fabric manager's log file from where it stood before a start: an earlier run's
    lines (LOG_APPEND_TO_LOG=1, the default) do not count."""

    path: Path
    offset: int

    @classmethod
    def before_start(cls, cfg: str) -> FabricLog | None:
        """None, with a warning, where the config keeps the line out of the file: a
        LOG_LEVEL below INFO (4), or LOG_USE_SYSLOG=1."""
        level = config_value(cfg, "LOG_LEVEL") or "4"
        if not level.isdigit() or int(level) < 4 or config_value(cfg, "LOG_USE_SYSLOG") == "1":
            log.warning(
                "The fabric manager's config (LOG_LEVEL=%s, LOG_USE_SYSLOG=%s) keeps its INFO "
                "lines out of its log file: on GPUs that report no fabric state (before "
                "Hopper) readiness waits only for the daemon to run, not for its NVSwitches",
                level,
                config_value(cfg, "LOG_USE_SYSLOG") or "0",
            )
            return None
        path = Path(config_value(cfg, "LOG_FILE_NAME") or DEFAULT_LOG)
        try:
            offset = path.stat().st_size
        except OSError:
            offset = 0
        return cls(path, offset)

    def says_configured(self) -> bool:
        """Whether the daemon logged, since the start, that its NVSwitches are configured."""
        try:
            with self.path.open("rb") as f:
                # Smaller than before: the start truncated it (LOG_APPEND_TO_LOG=0).
                f.seek(self.offset if os.fstat(f.fileno()).st_size >= self.offset else 0)
                return NVSWITCHES_CONFIGURED in f.read()
        except OSError:
            return False


def write_config(config: Config, fabric: Fabric) -> tuple[Path, str]:
    """The driver root's fabricmanager.cfg with FM_DEFAULTS and the operator's
    NVFM_CONFIG_<KEY> settings (which win), written atomically at FM_CONFIG_WRITTEN under
    the container's root: the path and the text the daemon reads."""
    assert fabric.config_file is not None  # check() passed
    settings = [
        *[(k, v) for k, v in FM_DEFAULTS if k not in dict(config.options.fabric_manager_config)],
        *config.options.fabric_manager_config,
    ]
    text = configured(fabric.config_file.read_text(), settings)
    path = config.own(FM_CONFIG_WRITTEN)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, text.encode())
    log.info(
        "Fabric manager config %s: %s from %s with %s",
        path,
        FM_CONFIG,
        fabric.config_file,
        ", ".join(f"{k}={v}" for k, v in settings),
    )
    return path, text


class GpuFabric(NamedTuple):
    """One GPU's registration with the fabric, as nvidia-smi -q -x reports it."""

    gpu: str  # its PCI bus id (the gpu element's id)
    state: str  # Not Started, In Progress, Completed; N/A where the GPU reports none
    status: str  # Success, or the error of a completed registration

    @property
    def up(self) -> bool:
        return (self.state, self.status) == (UP_STATE, UP_STATUS) or self.unreported

    @property
    def unreported(self) -> bool:
        return self.state in UNREPORTED_STATES

    @property
    def failed(self) -> bool:
        return self.state == UP_STATE and self.status != UP_STATUS

    def __str__(self) -> str:
        return f"{self.gpu}: {self.state}" + (f" ({self.status})" if self.failed else "")


def parse_fabric_states(xml: str) -> list[GpuFabric]:
    """The fabric state of each GPU of `nvidia-smi -q -x` (nvidia_smi_log/gpu/fabric)."""
    import xml.etree.ElementTree as ET  # NVSwitch boards only: not on every start

    states = []
    for gpu in ET.fromstring(xml).iter("gpu"):
        fabric = gpu.find("fabric")
        if fabric is None:  # a driver too old to report it: nothing to wait for
            continue
        states.append(
            GpuFabric(
                gpu=gpu.get("id", "?"),
                state=(fabric.findtext("state") or "").strip(),
                status=(fabric.findtext("status") or "").strip(),
            )
        )
    return states


def fabric_states(smi: Path) -> tuple[list[GpuFabric] | None, str]:
    """The GPUs' fabric states, or None and why nvidia-smi could not tell (yet)."""
    import xml.etree.ElementTree as ET

    result = run([smi, "-q", "-x"], check=False, timeout=SMI_TIMEOUT)
    if result.returncode != 0:
        said = (result.stdout + result.stderr).strip().splitlines()[-3:]
        return None, f"{smi} -q -x exited with status {result.returncode}: " + " ".join(said)
    try:
        return parse_fabric_states(result.stdout), ""
    except ET.ParseError as e:
        return None, f"{smi} -q -x printed no XML ({e})"


def wait_for_fabric(config: Config, timeout: float, fm_log: FabricLog | None = None) -> None:
    """Until every GPU's fabric registration completed, at most `timeout` seconds; where
    GPUs report none (before Hopper), until `fm_log` says the NVSwitches are configured.
    Raise when a registration failed, the daemon died, or time ran out."""
    smi = rootfs.find_nvidia_smi(config.options.container_root)
    deadline = time.monotonic() + timeout
    why = "nvidia-smi has not answered yet"
    while True:
        if daemons.running_pid(config, FM_PID) is None:
            raise DriverError(
                f"{FABRIC_MANAGER} is not running (no live process in its pid file "
                f"{FM_PID}): it exited before the NVLink fabric was up.",
                hint="See its log (LOG_FILE_NAME in fabricmanager.cfg, by default "
                "/var/log/fabricmanager.log, in the driver container).",
            )
        if smi is None:
            log.warning(
                "There is no nvidia-smi in the driver root to see the fabric state; "
                "not waiting for the NVLink fabric"
            )
            return
        states, why = fabric_states(smi)
        if states is not None:
            if failed := [s for s in states if s.failed]:
                raise DriverError(
                    "The fabric manager could not register GPUs with the NVLink fabric: "
                    + ", ".join(map(str, failed))
                    + ".",
                    hint="See the fabric manager's log (by default /var/log/fabricmanager.log) "
                    "and the kernel log (dmesg) for NVRM and nvidia-nvswitch lines.",
                )
            pending = [s for s in states if not s.up]
            unreported = not states or any(s.unreported for s in states)
            if not pending and unreported and fm_log is not None and not fm_log.says_configured():
                why = (
                    f"the GPUs report no fabric state, and the fabric manager's log "
                    f'{fm_log.path} does not say yet "{NVSWITCHES_CONFIGURED.decode()}"'
                )
            elif not pending:
                reported = [s for s in states if not s.unreported]
                log.info(
                    "The NVLink fabric is up (%d GPU(s) registered%s)",
                    len(reported),
                    f"; {len(states) - len(reported)} report no fabric state"
                    if len(reported) < len(states)
                    else "",
                )
                return
            else:
                why = "fabric state " + ", ".join(map(str, pending))
        if time.monotonic() >= deadline:
            raise DriverError(
                f"The NVLink fabric is not up {timeout:g} s after {FABRIC_MANAGER} started "
                f"({why}).",
                hint="See the fabric manager's log (by default /var/log/fabricmanager.log); "
                "training takes minutes on large boards: raise FABRIC_MANAGER_TIMEOUT if it "
                "was still in progress.",
            )
        time.sleep(POLL)


@contextlib.contextmanager
def fabric_manager(config: Config, *, keep: bool = False) -> Iterator[Fabric | None]:
    """The fabric manager, the fabric up, for the duration of a `with` block; nothing
    without an NVLink fabric (or with FABRIC_MANAGER=off).

    Entered after the modules load; leaving the block stops it (and nvlsm after it),
    unless `keep` (`load`: `unload` stops it). A failure, the bounded wait's included,
    stops what this block started: nothing is left running.
    """
    fabric = Fabric.detect(config)
    if not fabric.present:
        yield None
        return
    if config.options.fabric_manager == "off":
        log.warning(
            "This node has an NVLink fabric (%s); FABRIC_MANAGER=off: not starting %s "
            "(the host must run it, or CUDA fails with cudaErrorSystemNotReady)",
            fabric.devices(),
            FABRIC_MANAGER,
        )
        yield None
        return
    fabric.check(config)
    log.info("NVLink fabric: %s", fabric.devices())
    adopted = daemons.running_pid(config, FM_PID) is not None
    with contextlib.ExitStack() as stack:
        if fabric.nvlink5:  # started by the start script; stopped after the fabric manager
            stack.enter_context(daemons.running(config, _nvlsm(), lambda: None, keep=keep))
        config_file, cfg = write_config(config, fabric)
        # A running one (a restart adopts it) said so in an earlier part of its log.
        fm_log = None if adopted else FabricLog.before_start(cfg)
        argv = fabric.start_argv(config_file)
        stack.enter_context(
            daemons.running(
                config, _fm(), lambda: daemons.start_daemon(config, _fm(), argv), keep=keep
            )
        )
        wait_for_fabric(config, config.options.fabric_manager_timeout, fm_log)
        yield fabric


def stop(config: Config) -> None:
    """Stop the fabric manager, then nvlsm (`unload`, and before other modules unload);
    a daemon that will not stop is logged: the unload then finds the driver in use."""
    for daemon in (_fm(), _nvlsm()):
        try:
            daemons.stop_daemon(config, daemon)
        except DriverError as e:
            log.error("%s", e)


def report(config: Config) -> dict[str, Any]:
    """What `status` shows: the fabric's devices, the daemons' pids, what is missing."""
    fabric = Fabric.detect(config)
    present = fabric.present
    return {
        "mode": config.options.fabric_manager,
        "nvswitches": [
            {"address": d.address, "device": f"0x{d.device:04x}", "driver": d.driver}
            for d in fabric.nvswitches
        ],
        "pid": daemons.running_pid(config, FM_PID),
        "missing": fabric.fm_missing() if present else [],
        "nvlink5": list(fabric.nvlink5),
        "nvlsm": {
            "needed": bool(fabric.nvlink5),
            "pid": daemons.running_pid(config, NVLSM_PID) if fabric.nvlink5 else None,
            "missing": fabric.nvlsm_missing() + list(fabric.modules_missing),
        },
    }
