"""The local Flatcar mirror fixture is what it claims to be (tests/flatcar_mirror.py)."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import tests.flatcar_mirror as fm
from nvdriver.host import KernelIdentity
from nvdriver.kmod.modversions import read_symvers
from tests.integration import conftest_mirror

# The fixtures, also when no conftest.py exposes them.
flatcar_mirror = conftest_mirror.flatcar_mirror
flatcar_mirror_server = conftest_mirror.flatcar_mirror_server


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET"):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, dict(resp.headers), resp.read()


def _gpgv(keyring: Path, *args: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["gpgv", "--keyring", str(keyring), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def image_file(flatcar_mirror, tmp_path_factory):
    return fm.extract_image(
        flatcar_mirror.image, tmp_path_factory.mktemp("image") / "developer.bin"
    )


def _debugfs(image: Path, request: str) -> str:
    proc = subprocess.run(
        ["debugfs", "-R", request, f"{image}?offset={fm.ROOT_START_LBA * fm.SECTOR}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


def _ls(image: Path, directory: str) -> set[str]:
    """Names in a directory of the ROOT file system (`ls -p`: /ino/mode/uid/gid/name/size/)."""
    lines = _debugfs(image, f"ls -p {directory}").splitlines()
    names = {line.split("/")[5] for line in lines if line.count("/") >= 6}
    return names - {".", ".."}


# ------------------------------------------------------------------ the image


def test_image_layout_is_flatcar_container(flatcar_mirror, image_file):
    assert image_file.stat().st_size == flatcar_mirror.image_size
    assert flatcar_mirror.image_size % (fm.DISK_ALIGNMENT * fm.SECTOR) == 0
    assert image_file.stat().st_blocks * 512 < flatcar_mirror.image_size  # sparse
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(image_file)], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    assert table["label"] == "gpt"
    assert table["id"] == fm.DISK_GUID.upper()
    # Blank partitions 1-8 are never written into the table (disk_util).
    (root,) = table["partitions"]
    assert root["node"].endswith("9")
    assert root["start"] == 4096
    assert root["name"] == "ROOT"
    assert root["type"].lower() == fm.ROOT_TYPE_GUID
    assert (root["start"] + root["size"]) * 512 <= flatcar_mirror.image_size - 34 * 512


def test_root_filesystem_holds_the_kernel_tree(flatcar_mirror, image_file):
    kernel = flatcar_mirror.kernel_release
    assert _ls(image_file, "/lib/modules") == {kernel}
    # Flatcar's tree (install-extmod-build): one real directory, `source -> build`.
    build = _debugfs(image_file, f"stat /usr/lib/modules/{kernel}/build")
    assert "Type: directory" in build
    source = _debugfs(image_file, f"stat /usr/lib/modules/{kernel}/source")
    assert "Type: symlink" in source and 'Fast link dest: "build"' in source
    tree = _ls(image_file, f"/usr/lib/modules/{kernel}/build")
    assert {"Makefile", "include", "scripts", "arch", "Module.symvers", ".config"} <= tree
    assert {"modpost"} <= _ls(image_file, f"/usr/lib/modules/{kernel}/build/scripts/mod")
    assert not {n for n in _ls(image_file, "/usr/src") if n.startswith("linux-")}
    assert {"gcc", "gcc-12", "make", "ld"} <= _ls(image_file, "/usr/bin")
    super_block = subprocess.run(
        ["dumpe2fs", "-h", f"{image_file}?offset={fm.ROOT_START_LBA * fm.SECTOR}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"^Filesystem volume name:\s+ROOT$", super_block, re.MULTILINE)
    assert re.search(r"^Block size:\s+4096$", super_block, re.MULTILINE)
    assert re.search(r"^Errors behavior:\s+Remount read-only$", super_block, re.MULTILINE)
    os_release = _debugfs(image_file, "cat /etc/os-release")
    assert "ID=flatcar\n" in os_release
    assert f"VERSION={flatcar_mirror.version}\n" in os_release
    # The host's apt sources stay out of the image.
    assert "sources.list" not in _ls(image_file, "/etc/apt")
    assert _ls(image_file, "/etc/apt/sources.list.d") == set()


def _tree(devroot: Path, kernel: str) -> Path:
    return devroot / "usr" / "lib" / "modules" / kernel / "build"


def test_devroot_holds_another_build_of_the_host_headers_kernel(flatcar_mirror):
    """Flatcar ships a tree of another build than the kernel it boots: the release, the
    .config (so the vermagic) and every CRC are the booted kernel's, the build time in
    UTS_VERSION is not (docs/package.md, "Which package fits a kernel": coreos-modules and
    coreos-kernel are two builds)."""
    kernel = flatcar_mirror.kernel_release
    ours, host = _tree(flatcar_mirror.devroot, kernel), Path("/lib/modules") / kernel / "build"
    booted = KernelIdentity.from_build_tree(host)
    tree = KernelIdentity.from_build_tree(ours)
    assert tree.release == booted.release == kernel
    assert tree.version != booted.version and fm.TREE_UTS_VERSION in tree.version
    assert (ours / "Module.symvers").read_bytes() == (host / "Module.symvers").read_bytes()
    assert (ours / ".config").read_bytes() == (host / ".config").read_bytes()
    version = subprocess.run(
        ["dpkg-query", f"--admindir={flatcar_mirror.devroot}/var/lib/dpkg", "-W",
         "-f", "${Version}", f"linux-headers-{kernel}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert version == fm.headers_package_version(kernel)


def test_the_another_abi_devroot_differs_in_one_crc(flatcar_mirror):
    kernel = flatcar_mirror.kernel_release
    other = fm.build_mirror(kernel, version=flatcar_mirror.version, abi="another")
    assert other.root != flatcar_mirror.root
    ours = read_symvers(_tree(flatcar_mirror.devroot, kernel) / "Module.symvers")
    theirs = read_symvers(_tree(other.devroot, kernel) / "Module.symvers")
    changed = {n for n in ours if ours[n] != theirs.get(n)}
    assert changed == {fm.ANOTHER_ABI_SYMBOL}
    assert theirs[fm.ANOTHER_ABI_SYMBOL] == ours[fm.ANOTHER_ABI_SYMBOL] ^ fm.ANOTHER_ABI_XOR
    assert KernelIdentity.from_build_tree(_tree(other.devroot, kernel)).release == kernel


# ------------------------------------------------------------------ signatures, digests


def test_signatures_verify_with_the_key_and_fail_with_the_wrong_one(flatcar_mirror):
    image = flatcar_mirror.image
    digests = image.with_name(image.name + ".DIGESTS")
    for keyring, ok in ((flatcar_mirror.signing_keyring, True),
                        (flatcar_mirror.wrong_keyring, False)):  # fmt: skip
        for args in (
            (image.with_name(image.name + ".sig"), image),
            (digests.with_name(digests.name + ".asc"),),
            (digests.with_name(digests.name + ".sig"), digests),
            (flatcar_mirror.version_txt.with_name("version.txt.sig"), flatcar_mirror.version_txt),
        ):
            proc = _gpgv(keyring, *args)
            assert (proc.returncode == 0) == ok, (args, proc.stderr)
    # The armored public key is what Flatcar publishes; it holds a signing subkey.
    text = flatcar_mirror.signing_key.read_text()
    assert text.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")


def test_digests_match_the_image(flatcar_mirror):
    image = flatcar_mirror.image
    text = image.with_name(image.name + ".DIGESTS").read_text()
    sections = re.findall(r"^# (\w+) HASH\n([0-9a-f]+)  (\S+)$", text, re.MULTILINE)
    assert [s[0] for s in sections] == ["MD5", "SHA1", "SHA512"]
    data = hashlib.sha512()
    with image.open("rb") as f:
        while chunk := f.read(1 << 22):
            data.update(chunk)
    assert sections[2][1:] == (data.hexdigest(), image.name)
    asc = image.with_name(image.name + ".DIGESTS.asc").read_text()
    assert asc.startswith("-----BEGIN PGP SIGNED MESSAGE-----")
    assert data.hexdigest() in asc


def test_version_txt_and_feed(flatcar_mirror):
    values = dict(
        line.split("=", 1) for line in flatcar_mirror.version_txt.read_text().splitlines()
    )
    assert values["FLATCAR_VERSION"] == flatcar_mirror.version
    assert values["FLATCAR_VERSION_ID"] == flatcar_mirror.version
    build, branch, patch = flatcar_mirror.version.split(".")
    assert (values["FLATCAR_BUILD"], values["FLATCAR_BRANCH"], values["FLATCAR_PATCH"]) == (
        build, branch, patch,
    )  # fmt: skip
    assert {"FLATCAR_BUILD_ID", "FLATCAR_SDK_VERSION"} <= values.keys()

    feed = json.loads(flatcar_mirror.feed.read_text())
    assert flatcar_mirror.channel == "stable"
    assert flatcar_mirror.feed.name == "releases-stable.json"
    assert "current" in feed
    releases = {k: v for k, v in feed.items() if k != "current"}
    upstream = flatcar_mirror.kernel_release.split("-", 1)[0]
    matching = [k for k, v in releases.items() if v["major_software"]["kernel"][0] == upstream]
    assert sorted(matching) == sorted([flatcar_mirror.version, flatcar_mirror.older_version])
    # The first match in file order is the older release: the newest must be chosen.
    assert matching[0] == flatcar_mirror.older_version
    keys = list(releases)
    assert keys != sorted(keys, key=lambda v: tuple(map(int, v.split("."))))
    assert feed["current"]["major_software"]["kernel"][0] != upstream
    for value in feed.values():
        assert value["channel"] == "stable"
        assert value["architectures"] == ["amd64", "arm64"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+0000", value["release_date"])


def _stats(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    """Each path with its inode and mtime (ns): a rebuilt or rewritten file changes them."""
    return {p: (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in paths}


def test_second_build_comes_from_the_cache(
    flatcar_mirror: fm.FlatcarMirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same inputs again: no build step runs (every build of a developer root or of a
    mirror goes through `_build_atomically`), and neither the mirror's cache entry (every
    file) nor the developer root's (its directory, `complete` marker and `rootfs`) is
    rewritten."""
    built: list[Path] = []
    monkeypatch.setattr(fm, "_build_atomically", lambda final, build: built.append(final))
    entry, root_entry = flatcar_mirror.root.parent, flatcar_mirror.devroot.parent
    files = [entry, *entry.rglob("*"), root_entry, *root_entry.iterdir()]
    before = _stats(files)
    again = fm.build_mirror(flatcar_mirror.kernel_release, version=flatcar_mirror.version)
    assert built == []
    assert _stats(files) == before
    assert again == flatcar_mirror


# ------------------------------------------------------------------ the server


def test_server_serves_files_ranges_and_head(flatcar_mirror, flatcar_mirror_server):
    server = flatcar_mirror_server
    assert server.url.startswith("http://127.0.0.1:")
    data = flatcar_mirror.version_txt.read_bytes()
    status, headers, body = _get(server.url_for("version.txt"))
    assert (status, body) == (200, data)
    assert headers["Accept-Ranges"] == "bytes"

    status, headers, body = _get(server.url_for("version.txt"), {"Range": "bytes=5-20"})
    assert status == 206
    assert headers["Content-Range"] == f"bytes 5-20/{len(data)}"
    assert body == data[5:21]
    status, headers, body = _get(server.url_for("version.txt"), {"Range": "bytes=-10"})
    assert (status, body) == (206, data[-10:])
    status, headers, body = _get(server.url_for("version.txt"), {"Range": "bytes=10-"})
    assert (status, body) == (206, data[10:])
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(server.url_for("version.txt"), {"Range": f"bytes={len(data)}-"})
    assert err.value.code == 416

    size = flatcar_mirror.image.stat().st_size
    status, headers, body = _get(server.image_url, method="HEAD")
    assert (status, int(headers["Content-Length"]), body) == (200, size, b"")
    image_range = f"bytes={size - 100}-"
    status, headers, body = _get(server.image_url, {"Range": image_range})
    with flatcar_mirror.image.open("rb") as f:
        f.seek(size - 100)
        assert (status, body) == (206, f.read())

    status, _, body = _get(server.feed_url)
    assert json.loads(body) == json.loads(flatcar_mirror.feed.read_text())
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(server.url + "/amd64-usr/1.2.3/" + fm.IMAGE_NAME)
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(server.url + "/../../etc/passwd")
    assert err.value.code == 404
    env = server.env()
    assert env["FLATCAR_RELEASE_URL"] == server.url
    assert env["FLATCAR_SIGNING_KEY"] == str(flatcar_mirror.signing_key)


def test_close_after_n_bytes_then_resume(flatcar_mirror, flatcar_mirror_server):
    server = flatcar_mirror_server
    server.close_after(fm.IMAGE_NAME, 100_000)  # once
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", flatcar_mirror.url_path())
    resp = conn.getresponse()
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead) as err:
        resp.read()
    assert len(err.value.partial) == 100_000
    conn.close()
    # The fault was for one response: a resume gets the rest.
    status, _, body = _get(server.image_url, {"Range": "bytes=100000-100999"})
    assert status == 206 and len(body) == 1000
    records = server.requests_for(fm.IMAGE_NAME)
    assert [(r.status, r.sent) for r in records] == [(200, 100_000), (206, 1000)]

    server.close_after("version.txt", 10, times=None)  # always
    for _ in range(2):
        with pytest.raises(http.client.IncompleteRead):
            _get(server.url_for("version.txt"))


def test_tamper_fail_and_throttle(flatcar_mirror, flatcar_mirror_server):
    server = flatcar_mirror_server
    data = flatcar_mirror.version_txt.read_bytes()
    server.tamper("version.txt", 3, times=1)
    _, _, body = _get(server.url_for("version.txt"))
    assert body[3] == data[3] ^ 0xFF and body[:3] + body[4:] == data[:3] + data[4:]
    assert _get(server.url_for("version.txt"))[2] == data

    server.fail("version.txt", 500, times=1)
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(server.url_for("version.txt"))
    assert err.value.code == 500
    server.fail(flatcar_mirror.feed_url_path, 404)
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError):
            _get(server.feed_url)
    server.reset()
    assert _get(server.feed_url)[0] == 200

    server.ignore_range("version.txt", times=1)
    assert _get(server.url_for("version.txt"), {"Range": "bytes=5-"})[::2] == (200, data)
    assert _get(server.url_for("version.txt"), {"Range": "bytes=5-"})[::2] == (206, data[5:])

    server.throttle(1 << 20)  # 1 MiB/s: 256 KiB take >= 0.25 s
    started = time.monotonic()
    _, _, body = _get(server.image_url, {"Range": "bytes=0-262143"})
    assert len(body) == 262144
    assert time.monotonic() - started >= 0.2


# ------------------------------------------------------------------ hostile variants


def test_hostile_variants(flatcar_mirror, tmp_path):
    good = flatcar_mirror.signing_keyring

    truncated = fm.make_truncated_variant(flatcar_mirror, tmp_path / "truncated", keep=0.05)
    assert truncated.image.stat().st_size < flatcar_mirror.image.stat().st_size
    sig = truncated.image.with_name(fm.IMAGE_NAME + ".sig")
    assert _gpgv(good, sig, truncated.image).returncode == 0
    assert _gpgv(good, truncated.image.with_name(fm.IMAGE_NAME + ".DIGESTS.asc")).returncode == 0
    assert subprocess.run(["bzip2", "-tq", str(truncated.image)], check=False).returncode != 0
    # The cache is untouched (the copy was hard-linked, then replaced).
    assert _gpgv(good, flatcar_mirror.image.with_name(fm.IMAGE_NAME + ".sig"),
                 flatcar_mirror.image).returncode == 0  # fmt: skip

    wrong = fm.make_wrong_key_variant(flatcar_mirror, tmp_path / "wrong")
    sig = wrong.image.with_name(fm.IMAGE_NAME + ".sig")
    assert _gpgv(good, sig, wrong.image).returncode != 0
    assert _gpgv(flatcar_mirror.wrong_keyring, sig, wrong.image).returncode == 0
    assert wrong.image.samefile(flatcar_mirror.image)  # hard-linked, not copied

    corrupt = fm.make_corrupt_variant(flatcar_mirror, tmp_path / "corrupt")
    assert _gpgv(good, corrupt.image.with_name(fm.IMAGE_NAME + ".sig"), corrupt.image).returncode

    bad = fm.make_bad_digest_variant(flatcar_mirror, tmp_path / "bad-digest")
    assert _gpgv(good, bad.image.with_name(fm.IMAGE_NAME + ".sig"), bad.image).returncode == 0
    assert _gpgv(good, bad.image.with_name(fm.IMAGE_NAME + ".DIGESTS.asc")).returncode == 0
    assert "0" * 128 in bad.image.with_name(fm.IMAGE_NAME + ".DIGESTS").read_text()

    layout = fm.make_no_root_partition_variant(flatcar_mirror, tmp_path / "no-root")
    assert _gpgv(good, layout.image.with_name(fm.IMAGE_NAME + ".sig"), layout.image).returncode == 0
    raw = fm.extract_image(layout.image, tmp_path / "no-root.bin")
    parts = json.loads(
        subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, check=True).stdout
    )["partitiontable"]["partitions"]
    assert [p["node"][-1] for p in parts] == ["1", "2", "3"]
    assert all(p["name"] != "ROOT" for p in parts)
