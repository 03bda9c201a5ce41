"""A stand-in NVIDIA Fabric Manager (and the nvidia-smi that reports its fabric) in a
driver root: no NVSwitch and no GPU can exist on the test machine, so the daemon that
trains their NVLinks cannot run here. What stands in behaves as NVIDIA's does where the
product depends on it (docs/fabric-manager.md):

* `nv-fabricmanager -c CONFIG` fails without a readable config, else forks into the
  background (DAEMONIZE=1, the shipped default) and returns; the daemon writes its pid
  file, then registers the GPUs with the "fabric": "In Progress", after
  STANDIN_FM_DELAY seconds "Completed" (with STANDIN_FM_STATUS, default "Success"),
  never with STANDIN_FM_NEVER_UP; SIGTERM ends it and removes its pid file. With
  STANDIN_FM_FAIL_START it prints that and exits 1 instead of forking. Once up it appends
  NVIDIA's line "Successfully configured all the available NVSwitches ..." to the
  LOG_FILE_NAME of its config, as the real one does on NVSwitch gen 2 and 3 boards.
* `nvidia-smi -q -x` prints nvidia-smi's XML (nvsmi_device_v12.dtd: gpu/fabric/state
  and status) for the GPUs of `STANDIN_FABRIC_DIR/gpus`, with STANDIN_SMI_NO_FABRIC_STATE
  "N/A" as GPUs before Hopper (HGX A100) report it whatever the fabric does; plain
  `nvidia-smi` (the readiness check) passes.
* `nvidia-modprobe` (which the real fabric manager runs for /dev/nvidia-nvswitch*)
  notes that it ran.
* NVLink5's `nvidia-fabricmanager-start.sh` starts a stand-in nvlsm (its pid file from
  --nvlsm-pid-file) and then the fabric manager (--fm-pid-file).

A daemon holds open the files that STANDIN_FM_OPENS, STANDIN_NVLSM_OPENS or
STANDIN_PERSISTENCED_OPENS name (space-separated), as the real ones hold /dev/nvidia*.

Each program appends what it did to `STANDIN_FABRIC_DIR/events`, so a test sees the
order of starts, checks and stops. The stand-ins do not read their settings from the
environment: the product gives its children a minimal one (run.py). Each knows its
directory (written into it) and reads the STANDIN_* settings from the file `settings` there
(`configure`), where a variable given to it explicitly (the start script's pid files)
still wins. The pid file paths are settings too (STANDIN_FM_PIDFILE, STANDIN_NVLSM_PIDFILE,
STANDIN_PERSISTENCED_PIDFILE): the real daemons fix theirs, the tests move them
(fabric.FM_PID, fabric.NVLSM_PID, daemons.PERSISTENCED_PID) into a temporary tree.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from nvdriver import fabric

# A daemon: `NAME ARGS` forks `NAME --standin-daemon`, which writes $PIDFILE_VAR's file and
# runs BODY, then idles until SIGTERM (sleeping in short waits, so that the trap runs).
_DAEMON = r"""#!/bin/sh
# Stand-in @NAME@ (tests/standin/fabric.py): no NVSwitch can exist here.
@SETTINGS@
pidfile=${@PIDFILE_VAR@:?}
if [ "$1" = --standin-daemon ]; then
    sleeper=
    stop() {
        kill $sleeper 2>/dev/null
        rm -f "$pidfile"
        echo "@NAME@ stopped" >>"$dir/events"
        exit 0
    }
    trap stop TERM
    n=3
    for device in ${@OPENS_VAR@:-}; do  # the devices it holds open, from fd 3 on
        eval "exec $n<\"\$device\""
        n=$((n + 1))
    done
    mkdir -p "$(dirname "$pidfile")"
    echo $$ >"$pidfile"
@BODY@
    while :; do sleep 1 & sleeper=$!; wait $sleeper; done
fi
echo "@NAME@ started: $*" >>"$dir/events"
@CHECK@
setsid "$0" --standin-daemon </dev/null >/dev/null 2>&1 &
exit 0
"""

_FM_BODY = r"""    printf 'In Progress\nN/A\n' >"$dir/fabric-state"
    if [ -z "${STANDIN_FM_NEVER_UP:-}" ]; then
        sleep "${STANDIN_FM_DELAY:-0.5}" & sleeper=$!; wait $sleeper
        printf 'Completed\n%s\n' "${STANDIN_FM_STATUS:-Success}" >"$dir/fabric-state"
        printf '%s %s\n' "[Dec 06 2026 07:00:00] [INFO] [tid 1] Successfully configured" \
            "all the available NVSwitches to route GPU NVLink traffic." \
            >>"$(cat "$dir/fm-log-path")"
    fi"""
_FM_CHECK = r"""if [ "$1" != -c ] || [ ! -r "$2" ]; then
    echo "nv-fabricmanager: cannot open the config file '${2:-}'" >&2
    exit 1
fi
cp "$2" "$dir/fabricmanager.cfg.read"  # what it read, for the tests
log=$(sed -n 's/^LOG_FILE_NAME=//p' "$2" | tail -n 1)
echo "${log:-/var/log/fabricmanager.log}" >"$dir/fm-log-path"
if [ -n "${STANDIN_FM_FAIL_START:-}" ]; then
    echo "$STANDIN_FM_FAIL_START" >&2
    exit 1
fi"""

_SMI = r"""#!/bin/sh
# Stand-in nvidia-smi (tests/standin/fabric.py): reports the stand-in fabric's state.
@SETTINGS@
state="Not Started"; status="N/A"
if [ -r "$dir/fabric-state" ]; then
    { read -r state; read -r status; } <"$dir/fabric-state"
fi
[ -z "${STANDIN_SMI_NO_FABRIC_STATE:-}" ] || { state="N/A"; status="N/A"; }
echo "nvidia-smi${*:+ $*} (fabric $state)" >>"$dir/events"
[ "$*" = "-q -x" ] || exit 0
echo '<?xml version="1.0" ?>'
echo '<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_v12.dtd">'
echo '<nvidia_smi_log>'
echo "<attached_gpus>$(wc -l <"$dir/gpus")</attached_gpus>"
while read -r bus name; do
    echo "<gpu id=\"$bus\"><product_name>$name</product_name>"
    echo "<fabric><state>$state</state><status>$status</status></fabric></gpu>"
done <"$dir/gpus"
echo '</nvidia_smi_log>'
"""

_START = r"""#!/bin/sh
# Stand-in nvidia-fabricmanager-start.sh (tests/standin/fabric.py): nvlsm, then the FM.
@SETTINGS@
echo "nvidia-fabricmanager-start.sh $*" >>"$dir/events"
while [ $# -gt 0 ]; do
    case $1 in
        --mode) mode=$2 ;;
        --fm-config-file) fm_config=$2 ;;
        --fm-pid-file) fm_pid=$2 ;;
        --nvlsm-config-file) nvlsm_config=$2 ;;
        --nvlsm-pid-file) nvlsm_pid=$2 ;;
    esac
    shift 2
done
[ "$mode" = start ] && [ -r "$nvlsm_config" ] || { echo "usage" >&2; exit 1; }
bin=$(dirname "$0")
STANDIN_NVLSM_PIDFILE=$nvlsm_pid "$bin/../sbin/nvlsm" -F "$nvlsm_config" || exit 1
STANDIN_FM_PIDFILE=$fm_pid exec "$bin/nv-fabricmanager" -c "$fm_config"
"""


def _daemon(name: str, pidfile_var: str, body: str = "", check: str = "") -> str:
    return (
        _DAEMON.replace("@NAME@", name)
        .replace("@PIDFILE_VAR@", pidfile_var)
        .replace("@OPENS_VAR@", pidfile_var.replace("_PIDFILE", "_OPENS"))
        .replace("@BODY@", body)
        .replace("@CHECK@", check)
    )


FABRIC_MANAGER = _daemon("nv-fabricmanager", "STANDIN_FM_PIDFILE", _FM_BODY, _FM_CHECK)
NVLSM = _daemon("nvlsm", "STANDIN_NVLSM_PIDFILE")
PERSISTENCED = _daemon("nvidia-persistenced", "STANDIN_PERSISTENCED_PIDFILE")
_MODPROBE = """#!/bin/sh
# Stand-in nvidia-modprobe (tests/standin/fabric.py).
@SETTINGS@
echo "nvidia-modprobe $*" >>"$dir/events"
"""


# How a stand-in finds its directory and its settings (`_program` writes the directory in).
_SETTINGS = 'dir=@DIR@\n[ ! -r "$dir/settings" ] || . "$dir/settings"'


def _program(path: Path, text: str, state: Path) -> Path:
    """The stand-in `text` at `path`, with its directory `state`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("@SETTINGS@", _SETTINGS.replace("@DIR@", shlex.quote(str(state)))))
    path.chmod(0o755)
    return path


def persistenced(path: Path, state: Path) -> Path:
    """A stand-in nvidia-persistenced at `path` (its pid file: STANDIN_PERSISTENCED_PIDFILE)."""
    return _program(path, PERSISTENCED, state)


def configure(state: Path, **settings: str | Path) -> None:
    """Set STANDIN_* settings of the stand-ins of `state` (a variable that a stand-in is
    given explicitly still wins)."""
    state.mkdir(parents=True, exist_ok=True)
    with (state / "settings").open("a") as f:
        for name, value in settings.items():
            f.write(f"{name}=${{{name}-{shlex.quote(str(value))}}}\n")


def driver_root(
    root: Path,
    state: Path,
    gpus: dict[str, str],
    *,
    fabric_manager: bool = True,
    nvidia_modprobe: bool = True,
    nvlink5: bool = False,
) -> Path:
    """A driver root with the stand-in nvidia-smi and (`fabric_manager`) nv-fabricmanager
    with its config at NVIDIA's path; `nvlink5` adds nvlsm, its config and the start
    script; `nvidia_modprobe` the nvidia-modprobe it needs. `gpus`: bus id → name, what
    nvidia-smi reports; `state`: the stand-ins' directory (STANDIN_FABRIC_DIR), where the
    config's LOG_FILE_NAME is (`fabric_log`): NVIDIA's config otherwise."""
    state.mkdir(parents=True, exist_ok=True)
    (state / "settings").touch()
    (state / "gpus").write_text("".join(f"{bus} {name}\n" for bus, name in gpus.items()))
    (state / "events").touch()
    _program(root / "usr/bin/nvidia-smi", _SMI, state)
    if fabric_manager:
        _program(root / "usr/bin/nv-fabricmanager", FABRIC_MANAGER, state)
        config = root / fabric.FM_CONFIG.lstrip("/")
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            "# NVIDIA Fabric Manager configuration file (stand-in).\n"
            f"LOG_LEVEL=4\nLOG_FILE_NAME={fabric_log(state)}\nLOG_APPEND_TO_LOG=1\n"
            "DAEMONIZE=1\n"
            "# 0 - Do not abort running CUDA jobs when Fabric Manager exits.\n"
            "ABORT_CUDA_JOBS_ON_FM_EXIT=1\n"
        )
    if nvidia_modprobe:
        _program(root / "usr/bin/nvidia-modprobe", _MODPROBE, state)
    if nvlink5:
        _program(root / "usr/sbin/nvlsm", NVLSM, state)
        _program(root / "usr/bin/nvidia-fabricmanager-start.sh", _START, state)
        config = root / fabric.NVLSM_CONFIG.lstrip("/")
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text("# stand-in nvlsm.conf\n")
    return root


def fabric_log(state: Path) -> Path:
    """The fabric manager's log (LOG_FILE_NAME of the stand-in config)."""
    return state / "fabricmanager.log"


def events(state: Path) -> list[str]:
    return (state / "events").read_text().splitlines()
