"""What a build left on this machine: loop devices and mounts of ours."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def _loops() -> list[dict[str, object]]:
    out = subprocess.run(
        ["losetup", "--json", "--output", "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return list(json.loads(out or "{}").get("loopdevices", []))


def _identity(loop: dict[str, object]) -> tuple[int, int] | None:
    """The backing file's (st_dev, st_ino), as losetup reports them."""
    try:
        major, minor = str(loop["back-maj:min"]).strip().split(":")
        return os.makedev(int(major), int(minor)), int(str(loop["back-ino"]))
    except (KeyError, ValueError):
        return None


def ours(*roots: Path | str) -> dict[str, list[str]]:
    """Loop devices and mounts that lie under (or are backed by files under) any of
    `roots`, as this machine names them."""
    prefixes = tuple(str(root) for root in roots)
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
            str(d["name"]) for d in _loops() if str(d.get("back-file") or "").startswith(prefixes)
        ],
        "mounts": [m["target"] for m in mounts["filesystems"] if m["target"].startswith(prefixes)],
    }


def loops_of(directory: Path, named: str) -> list[str]:
    """Loop devices backed by a file under the host's `directory`, also where a container
    had it mounted at `named`: losetup shows such a back file by the container's name, the
    same for every directory mounted there, so that file is told by its device and inode.
    A loop whose file was deleted since is counted too (it can only have been left behind)."""
    files = {
        (st.st_dev, st.st_ino)
        for root, _, names in os.walk(directory)
        for st in (os.lstat(os.path.join(root, n)) for n in names)
    }
    host, container = str(directory).rstrip("/") + "/", named.rstrip("/") + "/"
    return [
        str(d["name"])
        for d in _loops()
        if (back := str(d.get("back-file") or "")).startswith(host)
        or (back.startswith(container) and (_identity(d) in files or back.endswith("(deleted)")))
    ]
