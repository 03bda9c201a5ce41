"""The developer container's kernel tree is found inside its root, whatever the node has.

Flatcar's /lib/modules/KERNEL/build is an absolute link (to /usr/src/linux-...): it must
be followed inside the mounted developer root. Followed on the node (a driver container
without that kernel's headers) it points nowhere, and a build in the container failed
with "has no kernel tree for K (it has: K)" (found by tests/vm/test_container.py).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from nvdriver.builder import _developer_kernel_tree
from nvdriver.errors import DriverError


def _devroot(tmp_path: Path, kernel: str) -> tuple[Path, Path]:
    """A developer root whose kernel tree lies at a path this machine does not have."""
    root = tmp_path / "root"
    headers = Path("/usr/src") / f"linux-headers-{kernel}"
    assert not headers.exists()
    (root / "usr/lib/modules" / kernel).mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")  # as in Flatcar's root
    output = root / headers.relative_to("/")
    (output / "include").mkdir(parents=True)
    (output / "Makefile").write_text("# kernel build tree\n")
    (root / "usr/lib/modules" / kernel / "build").symlink_to(headers)
    return root, output


def test_an_absolute_build_link_is_followed_inside_the_developer_root(tmp_path: Path) -> None:
    kernel = f"6.12.0-test{uuid.uuid4().hex[:8]}"
    root, output = _devroot(tmp_path, kernel)
    tree = _developer_kernel_tree(root, kernel, "4152.2.3")
    assert tree.output == output


def test_a_missing_tree_names_each_kernel_once(tmp_path: Path) -> None:
    kernel = f"6.12.0-test{uuid.uuid4().hex[:8]}"
    root, _ = _devroot(tmp_path, kernel)
    with pytest.raises(DriverError) as e:
        _developer_kernel_tree(root, "6.12.0-other", "4152.2.3")
    assert f"(it has: {kernel})" in e.value.message
