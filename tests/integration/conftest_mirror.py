"""Pytest fixtures for the local Flatcar release mirror (tests/flatcar_mirror.py).

Import them from a conftest.py:

    from tests.integration.conftest_mirror import flatcar_mirror, flatcar_mirror_server

`flatcar_mirror` (session): the cached mirror for the `kernel_release` fixture's
kernel where there is one (else the running kernel if its headers are here, else
the newest; `$FLATCAR_MIRROR_KERNEL` overrides that fallback); skips where it cannot be built
(not root, tools or kernel headers missing). The first build takes a minute or
two, later sessions reuse it from ~/.cache/nvidia-driver-tests/flatcar-mirror.

`flatcar_mirror_server` (function): a fresh `MirrorServer` serving it on
127.0.0.1, its fault knobs clear; `.env()` gives FLATCAR_RELEASE_URL,
FLATCAR_RELEASES_FEED, FLATCAR_SIGNING_KEY and FLATCAR_BOARD.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.flatcar_mirror import (
    FlatcarMirror,
    MirrorServer,
    MirrorUnavailable,
    build_mirror,
    default_kernel_release,
    serve_mirror,
)


@pytest.fixture(scope="session")
def flatcar_mirror(request: pytest.FixtureRequest) -> FlatcarMirror:
    try:
        kernel = str(request.getfixturevalue("kernel_release"))
    except pytest.FixtureLookupError:
        kernel = default_kernel_release()
    try:
        return build_mirror(kernel)
    except MirrorUnavailable as e:
        from tests.conftest import need  # (tests.conftest imports this module)

        need(False, f"no local Flatcar mirror: {e}")
        raise


@pytest.fixture
def flatcar_mirror_server(flatcar_mirror: FlatcarMirror) -> Iterator[MirrorServer]:
    with serve_mirror(flatcar_mirror) as server:
        yield server
