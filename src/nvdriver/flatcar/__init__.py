"""Flatcar Container Linux: which release ships a kernel, its developer container
(fetched, verified and cached), and that image mounted as a build root."""

from nvdriver.flatcar.fetch import fetch_developer_container
from nvdriver.flatcar.image import cleanup_stale, developer_root
from nvdriver.flatcar.release import FlatcarRelease, resolve

__all__ = [
    "FlatcarRelease",
    "cleanup_stale",
    "developer_root",
    "fetch_developer_container",
    "resolve",
]
