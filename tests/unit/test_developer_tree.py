"""The developer container's kernel tree is found inside its root, whatever the host has.

Found by running `update --kernel K` in the image: the developer root's
/lib/modules/K/build links to /usr/src/linux-headers-K, and the lookup followed that
absolute link on the host, where it only resolved because this machine has the same
headers installed; in a container it said "no kernel tree for K (it has: K)".
"""

from __future__ import annotations

from pathlib import Path

from nvdriver.builder import _developer_kernel_tree

KERNEL = "6.99.0-test-not-on-this-host"


def test_the_build_link_is_resolved_inside_the_developer_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    headers = Path("/usr/src") / f"linux-headers-{KERNEL}"
    assert not headers.exists()  # the link must not resolve on the host
    output = root / headers.relative_to("/")
    (output / "include").mkdir(parents=True)
    (output / "Makefile").write_text("# a kernel build tree\n")
    modules = root / "usr" / "lib" / "modules" / KERNEL
    modules.mkdir(parents=True)
    (modules / "build").symlink_to(headers)
    (root / "lib").symlink_to("usr/lib")

    tree = _developer_kernel_tree(root, KERNEL, "4152.2.3")

    assert tree.output == output
