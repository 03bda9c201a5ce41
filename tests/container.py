"""A private Docker engine and the images of the seed's workflow, for the image tests.

NVIDIA's documented Flatcar workflow is: build the driver image, `docker run ... update`
(the kernel modules are built in Flatcar's developer container and packed), `docker
commit --change 'ENTRYPOINT ["nvidia-driver","init"]'`, then run the committed image on
the node. This module does the host side of it with a real engine:

- `engine()`: `containerd` and `dockerd` (Debian's docker.io, no bridge network) with
  their own data root, exec root and sockets under a temporary directory, stopped and
  removed at the end. `Engine.docker(...)` runs /usr/bin/docker (the client that
  matches that dockerd) against it.
- the base image: `mmdebstrap --variant=minbase` of the host's own Debian sources (no
  registry is reachable here), carrying the packages the Dockerfile's first RUN installs,
  `docker import`ed; its tar is cached under ~/.cache/nvidia-driver-tests/images.
- `build_image(engine, variant)`: the repository's Dockerfile, unchanged, in its two
  driver sources: ``standin`` (DRIVER_SOURCE=nvidia, a stand-in NVIDIA .run served on
  127.0.0.1) and ``real`` (DRIVER_SOURCE=debian, Debian's 535.261.03 packages).
- `committed_image(engine, kernel, variant)`: the seed's `update` in a container of that
  image against the local Flatcar mirror of `kernel`, committed with entrypoint `init`
  and saved with `docker save`; the tar is cached, keyed by every input.

Session fixtures (imported by tests/conftest.py, so one engine serves the whole session):
`docker_engine` and `committed_images` (`committed_images(kernel, variant)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

Variant = Literal["standin", "real"]


@dataclasses.dataclass(frozen=True)
class CommittedImage:
    """The image `docker commit` made of the seed's `update` container, saved to a tar.

    `tar` is the output of `docker save name` (load it with `docker load -i tar`; the tar
    is in the shared cache: read it, never change it). `name` is the repository:tag the
    tar carries. Its entrypoint is `nvidia-driver init` with no command; its image store
    (PRECOMPILED_DIR, under NVIDIA_DRIVER_SOURCE) holds the package `update` made for
    `kernel`, at `package` (a path inside the image).
    """

    tar: Path
    name: str
    kernel: str
    variant: Variant
    driver_version: str
    package: str


class Engine:
    """A running private dockerd; `docker(...)` talks to it."""


def engine() -> Iterator[Engine]:
    """Start containerd and dockerd under a temporary directory; stop and remove them."""
    raise NotImplementedError


def committed_image(engine: Engine, kernel: str, variant: Variant) -> CommittedImage:
    """The committed image of `variant` for `kernel`: from the cache when every input is
    unchanged (Dockerfile, the program's code, the base image's recipe, the driver, the
    kernel's Flatcar mirror), else built, updated, committed and saved now."""
    raise NotImplementedError


CommittedImages = Callable[[str, Variant], CommittedImage]
