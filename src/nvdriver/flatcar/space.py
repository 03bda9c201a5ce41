"""Room on the cache's disk for a developer container, checked before it is downloaded.

A developer container is a 6 GiB sparse image: about 2.2 GiB of real content from a
~480 MB `.bz2` (Flatcar 4230's), so its need is the compressed size (a HEAD request's
Content-Length) times `EXPANSION`; where the server does not say, `UNKNOWN_NEED`. A disk
too small is refused before the first byte is written, with the bytes needed, the bytes
free and the directory: a fetch that fills `/var` would take the kubelet's disk with it.
The check is an estimate; a write that still meets a full disk is reported by the fetch.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from nvdriver.errors import DriverError
from nvdriver.flatcar.download import NETWORK_ERRORS, USER_AGENT, RetryPolicy, is_url

log = logging.getLogger(__name__)

# Real content per compressed byte, rounded up: 2.2 GiB from 480 MB is 4.9.
EXPANSION = 5
# A developer container's real content when the compressed size is not known.
UNKNOWN_NEED = 5 * 480 * 10**6
MiB = 1 << 20


def free_bytes(directory: Path) -> int:
    """What an unprivileged writer may still write on `directory`'s file system."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def compressed_size(url: str, policy: RetryPolicy) -> int | None:
    """The size of `url` (HEAD's Content-Length, or a local file's), None when not said.

    One try, no retries: the download that follows retries, and reports, what fails here.
    """
    if not is_url(url):
        path = Path(url)
        return path.stat().st_size if path.is_file() else None
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout) as response:
            length = response.headers.get("Content-Length")
    except (urllib.error.HTTPError, *NETWORK_ERRORS) as e:
        log.debug("No size of %s from a HEAD request: %s", url, e)
        return None
    return int(length) if length and length.isdigit() else None


def require_room_for_developer_container(url: str, directory: Path, policy: RetryPolicy) -> None:
    """Refuse to download the developer container at `url` into `directory` when its file
    system has less room than the image needs (see the module's docstring)."""
    size = compressed_size(url, policy)
    needed = size * EXPANSION if size is not None else UNKNOWN_NEED
    free = free_bytes(directory)
    if free >= needed:
        return
    basis = (
        f"{EXPANSION} times its {size} compressed bytes"
        if size is not None
        else "the server does not say its size"
    )
    raise DriverError(
        f"Not enough space in {directory} for the developer container {url}: it needs "
        f"about {needed} bytes ({needed // MiB} MiB: {basis}) and {free} bytes "
        f"({free // MiB} MiB) are free. Nothing was downloaded.",
        hint="Free space there (`nvidia-driver packages prune` removes the developer "
        "containers of releases other than the running and the next one) or point "
        "NVIDIA_DRIVER_CACHE at a larger file system.",
    )
