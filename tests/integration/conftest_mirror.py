"""Pytest fixtures for the local Flatcar release mirror (tests/flatcar_mirror.py).

Import them from a conftest.py:

    from tests.integration.conftest_mirror import flatcar_mirror, flatcar_mirror_server, mirrors

`mirrors` (session): `mirrors(K)` is the mirror whose developer root holds the headers
of kernel K, built once per inputs (kernel, headers version, suite, packages) and kept
in ~/.cache/nvidia-driver-tests/flatcar-mirror, so each kernel's mirror is built once
ever; the first build of one takes a minute or two. Where this machine cannot build
one (not root, tools or kernel headers missing) the test skips, and fails under `CI`.

`flatcar_mirror` (session): the mirror of the `kernel_release` fixture's kernel where
there is one (else the running kernel if its headers are here, else the newest;
`$FLATCAR_MIRROR_KERNEL` overrides that fallback). A test that runs once per kernel
(the `kernel` fixture) takes `mirrors(kernel)` instead.

`fleet_mirror` (session): two releases in one feed under one key (the running one with
the oldest kernel under test, the next with the newest: tests/flatcar_mirror.py
`build_fleet_mirror`), made from the two single-release mirrors.

`flatcar_mirror_server` (function): a fresh `MirrorServer` serving it on
127.0.0.1, its fault knobs clear; `.env()` gives FLATCAR_RELEASE_URL,
FLATCAR_RELEASES_FEED, FLATCAR_SIGNING_KEY and FLATCAR_BOARD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.flatcar_mirror import (
    FlatcarMirror,
    FleetMirror,
    MirrorServer,
    MirrorUnavailable,
    build_fleet_mirror,
    build_mirror,
    default_kernel_release,
    fleet_kernels,
    serve_mirror,
)

Mirrors = Callable[[str], FlatcarMirror]


@pytest.fixture(scope="session")
def mirrors() -> Mirrors:
    from tests.conftest import need  # tests.conftest imports this module

    built: dict[str, FlatcarMirror] = {}

    def mirror(kernel: str) -> FlatcarMirror:
        if kernel not in built:
            try:
                built[kernel] = build_mirror(kernel)
            except MirrorUnavailable as e:
                need(False, f"no local Flatcar mirror for {kernel}: {e}")
        return built[kernel]

    return mirror


@pytest.fixture(scope="session")
def flatcar_mirror(request: pytest.FixtureRequest, mirrors: Mirrors) -> FlatcarMirror:
    try:
        kernel = str(request.getfixturevalue("kernel_release"))
    except pytest.FixtureLookupError:
        kernel = default_kernel_release()
    return mirrors(kernel)


@pytest.fixture
def flatcar_mirror_server(flatcar_mirror: FlatcarMirror) -> Iterator[MirrorServer]:
    with serve_mirror(flatcar_mirror) as server:
        yield server


@pytest.fixture(scope="session")
def fleet_mirror() -> FleetMirror:
    from tests.conftest import need

    kernels = fleet_kernels()
    need(kernels is not None, "the fleet mirror needs kernels of two series (tests/kernels.py)")
    assert kernels is not None
    try:
        return build_fleet_mirror(*kernels)
    except MirrorUnavailable as e:
        need(False, f"no local Flatcar fleet mirror for {kernels}: {e}")
        raise
