"""Serve a local Flatcar mirror on 127.0.0.1 inside the QEMU guest (test_container.py).

The guest has no network to the host: the mirror's files are on the host's tree,
which the guest sees read-only, and the server runs in the guest. Usage:
``python -m tests.vm.serve_mirror MIRROR_JSON ARGS``: MIRROR_JSON is
`mirror_json()`'s output; writes to ARGS the `docker run` options, one a line, that
give a container the tool's environment for the mirror (the port the server got,
its signing key mounted at KEY_IN_CONTAINER), then serves until SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tests.flatcar_mirror import FlatcarMirror, MirrorServer


def mirror_json(mirror: FlatcarMirror) -> str:
    """`mirror` as JSON (paths as strings), for the guest's server."""
    return json.dumps(dataclasses.asdict(mirror), default=str)


def from_json(text: str) -> FlatcarMirror:
    fields: dict[str, Any] = json.loads(text)
    for f in dataclasses.fields(FlatcarMirror):
        if f.type in ("Path", Path):
            fields[f.name] = Path(fields[f.name])
    return FlatcarMirror(**fields)


KEY_IN_CONTAINER = "/keys/flatcar-signing-key.asc"


def docker_options(env: dict[str, str], channel: str) -> list[str]:
    """`docker run` options for the tool's mirror environment `env` (MirrorServer.env)."""
    env = {**env, "FLATCAR_CHANNEL": channel}
    key = env.pop("FLATCAR_SIGNING_KEY")
    return [
        f"--volume={key}:{KEY_IN_CONTAINER}:ro",
        f"--env=FLATCAR_SIGNING_KEY={KEY_IN_CONTAINER}",
        *(f"--env={name}={value}" for name, value in env.items()),
    ]


def main(mirror_file: str, args_file: str) -> None:
    mirror = from_json(Path(mirror_file).read_text())
    server = MirrorServer(mirror).start()
    tmp = f"{args_file}.tmp"
    Path(tmp).write_text("".join(f"{o}\n" for o in docker_options(server.env(), mirror.channel)))
    os.replace(tmp, args_file)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main(*sys.argv[1:3])
