"""What a build left on this machine: loop devices and mounts of ours."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def ours(*roots: Path | str) -> dict[str, list[str]]:
    """Loop devices and mounts that lie under (or are backed by files under) any of
    `roots`. A container's loop device shows its back file as the container names it."""
    prefixes = tuple(str(root) for root in roots)
    loops = json.loads(
        subprocess.run(["losetup", "--json"], capture_output=True, text=True, check=True).stdout
        or "{}"
    )
    mounts = json.loads(
        subprocess.run(
            ["findmnt", "--json", "--list", "-o", "TARGET"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    return {
        "loops": [
            d["name"]
            for d in loops.get("loopdevices", [])
            if str(d.get("back-file") or "").startswith(prefixes)
        ],
        "mounts": [m["target"] for m in mounts["filesystems"] if m["target"].startswith(prefixes)],
    }
