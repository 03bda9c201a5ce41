"""The device nodes and their /dev/char links on a real kernel (QEMU guest), with the
stand-in driver, whose /proc/driver/nvidia has MIG's capability files as the real one's.

systemd re-applies a container's device access from /dev/char/MAJOR:MINOR links at every
`daemon-reload` (cgroup v2, the systemd cgroup driver): each node needs its link. The guest
runs no systemd; what it proves is that the links exist, lead to the nodes the driver
serves (an open through a link reaches the stand-in), and go at unload and at init's
shutdown, while what someone else made stays.
"""

from __future__ import annotations

from pathlib import Path

from .conftest import Guest
from .scenario import Driver, expect, scenario

NODES = (
    "nvidiactl",
    "nvidia0",
    "nvidia-modeset",
    "nvidia-uvm",
    "nvidia-uvm-tools",
    "nvidia-caps/nvidia-cap1",
    "nvidia-caps/nvidia-cap2",
)

# For each node: its numbers, mode and owner; its link's target; whether the link leads to
# it (the same inode, what systemd resolves); whether an open through the link succeeds.
REPORT = r"""
report() {
    local name key maj min
    for name in $NODES; do
        key=${name//\//_}
        if [ ! -c /dev/$name ]; then say "$1_$key" none; continue; fi
        maj=$((16#$(stat -c %t /dev/$name))); min=$((16#$(stat -c %T /dev/$name)))
        say "$1_$key" "$(stat -c '%a %u:%g' /dev/$name)"
        say "$1_${key}_link" "$(readlink /dev/char/$maj:$min)"
        say "$1_${key}_same" "$([ /dev/char/$maj:$min -ef /dev/$name ] && echo yes || echo no)"
        say "$1_${key}_open" "$( (exec 3</dev/char/$maj:$min) 2>/dev/null && echo yes || echo no)"
    done
}
left() {
    say "$1_nodes" "$(cd /dev && ls -d nvidia* 2>/dev/null | paste -sd, -)"
    say "$1_char" "$(ls -A /dev/char 2>/dev/null | paste -sd, -)"
    say "$1_record" "$([ -e /run/nvidia/device-nodes.json ] && echo yes || echo no)"
}
"""


def made(prefix: str) -> dict[str, str]:
    """What `report` says of the nodes after a load: the stand-in's params file gives the GPU
    nodes 0660; MIG's config is 0400 and monitor 0444 (the driver's DeviceFileMode);
    /dev/nvidiactl is someone else's (0600) and gets its link all the same."""
    modes = {"nvidiactl": "600", "nvidia-caps/nvidia-cap1": "400", "nvidia-caps/nvidia-cap2": "444"}
    facts = {}
    for name in NODES:
        key = f"{prefix}_{name.replace('/', '_')}"
        facts[key] = f"{modes.get(name, '660')} 0:0"
        facts[f"{key}_link"] = f"../{name}"
        facts[f"{key}_same"] = "yes"
        # The stand-in's nvidia-uvm serves minor 0 only: nvidia-uvm-tools (minor 1) opens
        # with ENXIO there, through its node as through its link.
        facts[f"{key}_open"] = "no" if name == "nvidia-uvm-tools" else "yes"
    return facts


def test_every_node_has_its_dev_char_link_and_unload_removes_only_what_was_made(
    guest: Guest, standin: Driver, tmp_path: Path
) -> None:
    body = r"""
    # Someone else's: /dev/nvidiactl without a link, a link of another device.
    mknod -m 600 /dev/nvidiactl c 195 255
    mkdir -p /dev/char && ln -s ../null /dev/char/1:3
    nv load 2>$LOGS/load.log; say load_rc $?
    say caps_major "$(awk '$2 == "nvidia-caps" { print "yes" }' /proc/devices)"
    report load
    nv load 2>$LOGS/load-again.log; say again_rc $?
    nv unload 2>$LOGS/unload.log; say unload_rc $?
    left unload
    start_init $LOGS/init.log
    wait_ready; say ready_rc $?
    report init
    stop_init TERM; say init_rc $INIT_RC
    left stopped
    """
    nodes = f"NODES='{' '.join(NODES)}'\n"
    facts, explain = scenario(guest, standin, tmp_path, nodes + REPORT + body)
    gone = {"nodes": "nvidiactl", "char": "1:3", "record": "no"}
    expect(
        facts,
        {
            "load_rc": "0",
            "caps_major": "yes",
            **made("load"),
            "again_rc": "0",
            "unload_rc": "0",
            **{f"unload_{k}": v for k, v in gone.items()},
            "ready_rc": "0",
            **made("init"),
            "init_rc": "0",
            **{f"stopped_{k}": v for k, v in gone.items()},
        },
        explain,
    )
    again = (tmp_path / "load-again.log").read_text()  # the driver kept: nothing to make
    assert "Made /dev/" not in again and "Made the links" not in again, explain
