"""Which kernels the tests run on (tests/kernels.py) and CI's rule for them
(tests/conftest.py `kernel`), on synthetic /boot and /lib/modules trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import conftest, kernels


def install(root: Path, release: str, *, image: bool = True, headers: bool = True) -> None:
    (root / "boot").mkdir(exist_ok=True)
    if image:
        (root / "boot" / f"vmlinuz-{release}").write_bytes(b"")
    moddir = root / "modules" / release
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text("")
    if headers:
        (moddir / "build").mkdir()
        (moddir / "build" / "Makefile").write_text("")


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(kernels, "BOOT_DIR", tmp_path / "boot")
    monkeypatch.setattr(kernels, "MODULES_DIR", tmp_path / "modules")
    (tmp_path / "modules").mkdir()
    return tmp_path


def test_the_newest_pair_of_each_series_in_version_order(machine: Path) -> None:
    for release in (
        "6.12.9+deb12-amd64",
        "6.1.0-9-amd64",
        "6.1.0-57-amd64",
        "6.12.117+deb12-amd64",
    ):
        install(machine, release)
    install(machine, "6.1.0-100-amd64", headers=False)  # no headers: not a pair
    install(machine, "6.6.1-amd64", image=False)  # no image: not a pair
    assert kernels.kernel_pairs() == [
        "6.1.0-9-amd64",
        "6.1.0-57-amd64",
        "6.12.9+deb12-amd64",
        "6.12.117+deb12-amd64",
    ]
    assert kernels.kernels_under_test() == ["6.1.0-57-amd64", "6.12.117+deb12-amd64"]
    assert kernels.header_kernels()[-1] == "6.12.117+deb12-amd64"
    assert "6.6.1-amd64" in kernels.header_kernels()


def ids(params: list[object]) -> list[str]:
    return [p.id for p in params]  # type: ignore[attr-defined]


def test_ci_fails_for_a_missing_series(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(machine, "6.1.0-57-amd64")
    monkeypatch.setenv("CI", "true")
    assert ids(conftest._kernel_params()) == ["6.1.0-57-amd64", "6.12-missing"]
    monkeypatch.delenv("CI")
    assert ids(conftest._kernel_params()) == ["6.1.0-57-amd64"]


def test_no_kernel_at_all_is_one_parameter_that_skips_or_fails(
    machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    assert ids(conftest._kernel_params()) == ["no-kernel"]
    monkeypatch.setenv("CI", "1")
    assert ids(conftest._kernel_params()) == ["6.1-missing", "6.12-missing"]
