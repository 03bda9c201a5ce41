"""Packages shared through a real OCI registry (issue 12, points 4-6).

Debian's `docker-registry` (distribution 2.8) runs on 127.0.0.1 with htpasswd basic auth
and TLS by a throw-away CA (tests/registry.py); a fault proxy in front of it breaks
answers the way a network or a hostile registry does. Signing and verification use
real gpg/gpgv with keys made here. The packages are the test suite's stand-ins
(tests/packaging.py's plain-file builds, and one stand-in driver built by kbuild).

What cannot exist here, and only that, is replaced: a Flatcar developer container for
this machine's running kernel (a CI kernel, not Flatcar's). Where a test needs the
fallback build to succeed, that one step (`builder._in_developer_container`) makes a
plain-file package and records that it ran; where it must be impossible, the real
build path runs and fails (the releases feed at a dead port, no --kernel-source).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvdriver import backoff, builder, lifecycle, registry
from nvdriver.config import Config
from nvdriver.driver import package as pkg
from nvdriver.driver.build import BuildOutput
from nvdriver.driver.package import Package
from nvdriver.driver.source import DriverSource, Flavour
from nvdriver.errors import DriverError
from nvdriver.host import KernelIdentity
from nvdriver.kmod.abi import RunningAbi
from tests.conftest import need, run_tool, standin_env
from tests.packaging import FAKE_RELEASE, KERNEL, fake_build, host_build_tree
from tests.registry import (
    PASSWORD,
    USER,
    FaultProxy,
    Key,
    Registry,
    dead_port,
    make_key,
    serve_registry,
    tools_missing,
)
from tests.standin.tree import make_standin_source

VERSION = "535.999.01"


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    missing = tools_missing()
    need(not missing, f"missing {', '.join(missing)} (docker-registry, apache2-utils)")
    with serve_registry(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Key]:
    work = tmp_path_factory.mktemp("keys")
    return {name: make_key(work, name) for name in ("fleet", "attacker")}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_standin_source(
        tmp_path_factory.mktemp("src") / f"nvidia-{VERSION}", version=VERSION, flavours=("kernel",)
    )


def node_env(work: Path, source: Path, reg: Registry, keys: dict[str, Key]) -> dict[str, str]:
    """A node (its own stores, cache and host tree with this machine's /proc) that cannot
    build: no Flatcar feed (a missing file), the mirror at a dead port, no kernel tree."""
    host = work / "host"
    host.mkdir(parents=True)
    (host / "proc").symlink_to("/proc")
    dead = f"http://127.0.0.1:{dead_port()}"
    return {
        **standin_env(work, source, VERSION),
        **reg.env(),
        "HOST_ROOT": str(host),
        "CONTAINER_ROOT": str(work / "container"),
        "FLATCAR_RELEASES_FEED": str(work / "no-feed.json"),
        "FLATCAR_RELEASE_URL": dead,
        "PRECOMPILED_REGISTRY": reg.reference,
        "PRECOMPILED_TRUSTED_KEYS": str(keys["fleet"].public),
        "PRECOMPILED_SIGNING_KEY": str(keys["fleet"].secret),
    }


@dataclasses.dataclass
class Node:
    env: dict[str, str]
    config: Config
    work: Path

    @property
    def store(self) -> Path:
        return self.config.node_precompiled_dir

    def files(self) -> list[Path]:
        """Everything in the node's store (a failed pull must leave nothing)."""
        return sorted(p for p in self.store.rglob("*")) if self.store.exists() else []


@pytest.fixture
def make_node(
    tmp_path: Path, source: Path, reg: Registry, keys: dict[str, Key], monkeypatch
) -> Iterator[object]:
    def make(name: str, **extra: str) -> Node:
        env = {**node_env(tmp_path / name, source, reg, keys), **extra}
        for k, v in env.items():  # the registry module reads the credentials at use
            monkeypatch.setenv(k, v)
        return Node(env, Config.from_env(env), tmp_path / name)

    yield make


def running_kernel(node: Node) -> KernelIdentity:
    """The running kernel with an ABI: KERNEL's vermagic and CRCs (tests/packaging.py)."""
    return KernelIdentity.running(node.config).with_abi(KERNEL.vermagic, dict(KERNEL.symbols))


def with_host_tree(node: Node) -> Node:
    """Give the node's host a build tree of its running kernel (its Module.symvers): the
    evidence of the running kernel's CRCs (kmod/abi.py)."""
    host_build_tree(node.config.host("/lib/modules"), running_kernel(node))
    return node


def running_package(node: Node, kernel: KernelIdentity | None = None) -> Package:
    """A stand-in package of plain files for the running kernel (or `kernel`), written
    into a scratch store of `node`."""
    build = fake_build(node.work / "build", kernel=kernel or running_kernel(node))
    build = dataclasses.replace(build, driver_version=VERSION)
    return pkg.write_package(node.work / "scratch-store", build, tag=None)


def running_abi(config: Config) -> RunningAbi:
    return RunningAbi(config, KernelIdentity.running(config).release)


def find(config: Config) -> Package:
    source = DriverSource.from_config(config)
    return lifecycle._find_package(config, running_abi(config), source, Flavour.PROPRIETARY)


@pytest.fixture
def fallback_builds(monkeypatch) -> list[Config]:
    """The fallback build, made possible: the one step that cannot exist here (a Flatcar
    developer container for this machine's kernel) makes a plain-file package."""
    built: list[Config] = []

    def developer_container_build(
        config, source, flavour, work: Path, target
    ) -> tuple[BuildOutput, str]:
        built.append(config)
        build = fake_build(
            work / "fake",
            kernel=KernelIdentity.running(config).with_abi(KERNEL.vermagic, dict(KERNEL.symbols)),
        )
        return dataclasses.replace(build, driver_version=VERSION), FAKE_RELEASE

    monkeypatch.setattr(builder, "_in_developer_container", developer_container_build)
    return built


def raw_push(
    node: Node,
    package: Path,
    *,
    signature: bytes | None,
    annotations: dict[str, str],
    tag: str,
    reference: str | None = None,
) -> None:
    """Push an artifact as anyone with push rights could: any file, any signature (or
    none), any annotations, under `tag`. Digests are valid: the registry checks them."""
    client = registry.Client.for_config(
        node.config, registry.Reference.parse(reference or node.env["PRECOMPILED_REGISTRY"])
    )
    layer = registry.descriptor_of(registry.PACKAGE_LAYER, package)
    sig = None
    client.push_blob(registry.descriptor_of(registry.EMPTY_TYPE, registry.EMPTY).digest, b"{}")
    client.push_blob(layer.digest, package)
    if signature is not None:
        sig = registry.descriptor_of(registry.SIGNATURE_LAYER, signature)
        client.push_blob(sig.digest, signature)
    client.push_manifest(tag, registry.artifact_manifest(layer, sig, annotations))


def wanted_for(node: Node) -> registry.Wanted:
    abi = running_abi(node.config)
    return registry.Wanted(abi.release, abi.fit, VERSION, "proprietary", None)


def annotations_of(package: Package) -> dict[str, str]:
    return registry.annotations_for(package.manifest)


def registry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Registry ")]


# --- sharing: push, pull, a second node that never builds


def test_a_second_node_pulls_its_package_and_never_builds(make_node, caplog) -> None:
    """Node A's package, pushed; node B (its own stores, and no way to build: the real
    build path would fail at the dead feed) finds it in the registry and uses it."""
    a, b = make_node("a"), make_node("b")
    package = running_package(a)
    pushed = registry.push(a.config, package, registry.Reference.parse(a.config.registry))
    caplog.set_level(logging.INFO)
    found = find(b.config)
    assert found.path.parent.parent == b.store
    assert found.path.read_bytes() == package.path.read_bytes()
    assert "building one" not in caplog.text and "No precompiled package" not in caplog.text
    assert f"Pulled {found.path.name} from the registry {pushed}" in caplog.text
    record = json.loads(Path(f"{found.path}.origin.json").read_text())
    assert record["origin"] == "registry" and record["reference"] == pushed
    assert record["tag"] == registry.artifact_tag(
        VERSION, KernelIdentity.running(b.config).release, "proprietary", None
    )
    # The next start finds it in its own store: no second pull.
    caplog.clear()
    assert find(b.config).path == found.path and "Pulled" not in caplog.text


def test_a_node_that_builds_pushes_when_allowed_and_the_fleet_compiles_once(
    make_node, reg: Registry, fallback_builds, caplog
) -> None:
    ref = f"{reg.reference}-once"  # a repository with nothing in it yet
    a = make_node("a", PRECOMPILED_REGISTRY_PUSH="true", PRECOMPILED_REGISTRY=ref)
    caplog.set_level(logging.INFO)
    built = find(a.config)
    assert len(fallback_builds) == 1 and built.path.parent.parent == a.store
    [line] = registry_lines(caplog)
    assert "There is no package tagged" in line
    assert f"Pushed {built.path.name} to {ref}:" in caplog.text
    b = make_node("b", PRECOMPILED_REGISTRY=ref)
    assert find(b.config).path.read_bytes() == built.path.read_bytes()
    assert len(fallback_builds) == 1  # b did not build


def test_update_push_then_pull_byte_exact_with_auth_and_tls(
    make_node, kernel_build: Path, tmp_path: Path, keys
) -> None:
    """`update --push` as a build node runs it (the stand-in built by kbuild for the
    headers' kernel), then a pull into another node's store: the same bytes. --debug:
    no credential appears in its output."""
    a = make_node("a")
    env = {k: v for k, v in a.env.items() if k != "PRECOMPILED_REGISTRY"}
    tool = run_tool(
        "update", "--debug", "--kernel-source", str(kernel_build), "-m", "2",
        "--push", a.env["PRECOMPILED_REGISTRY"], env=env,
    )  # fmt: skip
    assert tool.returncode == 0, tool.stderr
    built = Path(tool.stdout.strip())
    assert "Pushed " + built.name in tool.stderr
    assert_no_credentials(tool.stdout + tool.stderr, keys)
    m = pkg.read_manifest(built)
    b = make_node("b")
    abi = RunningAbi(b.config, m.kernel_release)
    wanted = registry.Wanted(m.kernel_release, abi.fit, VERSION, m.flavour, None)
    pulled = registry.pull(b.config, registry.Reference.parse(b.config.registry), wanted, b.store)
    assert pulled.path.read_bytes() == built.read_bytes()
    assert pulled.path == b.store / m.kernel_release / built.name


@pytest.mark.parametrize(
    "key,expected",
    [
        ("", "--push needs PRECOMPILED_SIGNING_KEY"),
        ("public", "is not an armored OpenPGP secret key"),
        ("/nonexistent-key.asc", "cannot be read"),
    ],
)
def test_update_push_without_a_usable_signing_key_is_a_usage_error_before_building(
    make_node, keys, key: str, expected: str
) -> None:
    a = make_node("a")
    key = str(keys["fleet"].public) if key == "public" else key
    env = {**a.env, "PRECOMPILED_SIGNING_KEY": key}
    tool = run_tool(
        "update", "--kernel-source", "/nonexistent", "--push", a.config.registry, env=env
    )
    assert tool.returncode == 2, tool.stderr
    assert expected in tool.stderr
    assert "/nonexistent " not in tool.stderr  # refused before the build looked at the tree


# --- credentials are never shown


def assert_no_credentials(text: str, keys: dict[str, Key]) -> None:
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert PASSWORD not in text and basic not in text
    secret = keys["fleet"].secret.read_text()
    body = "".join(secret.splitlines()[2:6])
    assert body and body not in text.replace("\n", "")


@pytest.mark.parametrize("how", ["env", "auth-file"])
def test_credentials_never_appear_in_the_output_with_debug(
    make_node, keys, tmp_path: Path, how: str
) -> None:
    a = make_node("a")
    registry.push(a.config, running_package(a), registry.Reference.parse(a.config.registry))
    env = dict(make_node("b").env)
    if how == "auth-file":
        auth = tmp_path / "docker" / "config.json"
        auth.parent.mkdir()
        pair = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        auth.write_text(
            json.dumps({"auths": {env["PRECOMPILED_REGISTRY"].split("/")[0]: {"auth": pair}}})
        )
        env = {k: v for k, v in env.items() if not k.startswith("PRECOMPILED_REGISTRY_U")}
        env.pop("PRECOMPILED_REGISTRY_PASSWORD")
        env["REGISTRY_AUTH_FILE"] = str(auth)
    env["NVIDIA_DRIVER_TEST_PAUSE_AT"] = "linked"
    # init pulls, then links the stand-in's plain files (which fails: they are no objects)
    tool = run_tool("init", "--debug", env=env)
    assert "Pulled nvidia-535.999.01-proprietary.tar.gz from the registry" in tool.stderr
    assert_no_credentials(tool.stdout + tool.stderr, keys)


# --- trust: the attacker's push


def attack(node: Node, keys: dict[str, Key], kind: str) -> None:
    """A well-formed package for this node under the right tag, valid digests, but
    signed by another key, unsigned, or with the fleet's signature of another file."""
    from nvdriver import trust

    evil = running_package(node)
    other = running_package(dataclasses.replace(node, work=node.work / "other"))
    signature = {
        "other key": trust.sign(evil.path, keys["attacker"].secret),
        "unsigned": None,
        "fleet signature of another package": trust.sign(other.path, keys["fleet"].secret),
    }[kind]
    raw_push(
        node,
        evil.path,
        signature=signature,
        annotations=annotations_of(evil),
        tag=wanted_for(node).artifact_tag,
    )


ATTACKS = ["other key", "unsigned", "fleet signature of another package"]
REASONS = {
    "other key": "which the configured fleet keys (PRECOMPILED_TRUSTED_KEYS)",
    "unsigned": "carries no signature: refused",
    "fleet signature of another package": "does not match its content",
}


@pytest.mark.parametrize("kind", ATTACKS)
def test_the_attackers_push_is_refused_and_the_node_builds(
    make_node, keys, fallback_builds, caplog, kind: str
) -> None:
    node = make_node("node")
    attack(node, keys, kind)
    caplog.set_level(logging.INFO)
    package = find(node.config)
    [line] = registry_lines(caplog)
    assert node.config.registry in line and wanted_for(node).artifact_tag in line
    assert REASONS[kind] in line
    assert len(fallback_builds) == 1
    assert node.files() == [package.path.parent, package.path]  # the built one, only


@pytest.mark.parametrize("kind", ATTACKS)
def test_the_attackers_push_is_exit_5_when_the_node_cannot_build(
    make_node, keys, kind: str
) -> None:
    node = make_node("node")
    attack(node, keys, kind)
    tool = run_tool("init", env=node.env)
    assert tool.returncode == 5, tool.stderr
    assert "building one failed" in tool.stderr and REASONS[kind] in tool.stderr
    assert node.files() == []


def test_no_trusted_keys_means_no_pull(make_node, fallback_builds, caplog) -> None:
    a = make_node("a")
    registry.push(a.config, running_package(a), registry.Reference.parse(a.config.registry))
    node = make_node("node", PRECOMPILED_TRUSTED_KEYS="")
    caplog.set_level(logging.INFO)
    find(node.config)
    [line] = registry_lines(caplog)
    assert "PRECOMPILED_TRUSTED_KEYS is not set" in line and len(fallback_builds) == 1


# --- another kernel under the right tag


def test_a_package_for_another_kernel_by_its_annotations_is_refused_before_download(
    make_node, keys, fallback_builds, caplog
) -> None:
    from nvdriver import trust

    node = make_node("node")
    other = running_package(
        node, kernel=KernelIdentity("6.1.0-99-amd64", "Linux version 6.1.0-99-amd64 x")
    )
    raw_push(
        node,
        other.path,
        signature=trust.sign(other.path, keys["fleet"].secret),
        annotations=annotations_of(other),  # honest: for 6.1.0-99
        tag=wanted_for(node).artifact_tag,
    )
    caplog.set_level(logging.INFO)
    find(node.config)
    [line] = registry_lines(caplog)
    assert "is not for this node: kernel-release='6.1.0-99-amd64'" in line
    assert len(fallback_builds) == 1


def another_abi(node: Node) -> KernelIdentity:
    """The running kernel's release with another CRC of one symbol: another build."""
    running = running_kernel(node)
    symbols = dict(running.symbols)
    symbols["_printk"] ^= 0x5A5A5A5A
    return running.with_abi(running.vermagic, symbols)


def test_a_package_for_another_abi_of_the_release_is_refused_before_download(
    make_node, keys, fallback_builds, caplog, reg
) -> None:
    """Honest annotations of the same release with another CRC for `_printk`: a node that
    can read its kernel's CRCs (a mounted build tree) refuses it from the annotations,
    fetching no blob of the package, and builds."""
    from nvdriver import trust

    node = with_host_tree(make_node("node"))
    other = running_package(node, kernel=another_abi(node))
    raw_push(
        node,
        other.path,
        signature=trust.sign(other.path, keys["fleet"].secret),
        annotations=annotations_of(other),
        tag=wanted_for(node).artifact_tag,
    )
    caplog.set_level(logging.INFO)
    package = find(node.config)
    [line] = registry_lines(caplog)
    assert "does not fit this node's kernel" in line and "_printk" in line
    assert len(fallback_builds) == 1 and package.manifest.kernel == running_kernel(node)
    blob = "sha256:" + pkg.sha256_file(other.path)
    fetched = [r for r in reg.log.read_text().splitlines() if blob in r and "method=GET" in r]
    assert fetched == []


def test_a_signed_package_for_another_kernel_build_is_refused_by_its_own_manifest(
    make_node, keys, fallback_builds, caplog
) -> None:
    """Annotations that lie (they name this kernel's ABI), a fleet signature, valid
    digests: the package's own manifest is for another ABI of the same release."""
    from nvdriver import trust

    node = make_node("node")
    other = running_package(node, kernel=another_abi(node))
    raw_push(
        node,
        other.path,
        signature=trust.sign(other.path, keys["fleet"].secret),
        annotations=annotations_of(
            running_package(dataclasses.replace(node, work=node.work / "r"))
        ),
        tag=wanted_for(node).artifact_tag,
    )
    caplog.set_level(logging.INFO)
    package = find(node.config)
    [line] = registry_lines(caplog)
    assert "although its annotations say it is for this node" in line
    assert len(fallback_builds) == 1
    assert node.files() == [package.path.parent, package.path]


# --- faults of the registry and the network


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The registry client's waits between tries, on a virtual clock: recorded (and the
    clock moved on by them), not slept."""
    now, recorded = [0.0], []

    def sleep(seconds: float) -> None:
        recorded.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(backoff, "clock", lambda: now[0])
    monkeypatch.setattr(backoff, "sleep", sleep)
    return recorded


@pytest.fixture
def proxied(make_node, reg: Registry, waits):
    """A good, signed package in the registry, and a node that pulls through the proxy."""
    a = make_node("a")
    package = running_package(a)
    registry.push(a.config, package, registry.Reference.parse(a.config.registry))
    digest = registry.descriptor_of(registry.PACKAGE_LAYER, package.path).digest
    with FaultProxy(reg, package_digest=digest) as proxy:
        node = make_node("node", PRECOMPILED_REGISTRY=proxy.reference)
        yield proxy, node


FAULTS = {
    # fault: (what the log line says, integrity failure?)
    "cut": ("The connection broke after", False),
    "garbage-manifest": ("is not a package artifact", True),
    "flip": ("its bytes are not the ones the manifest names", True),
    "404": ("There is no package tagged", False),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_registry_fault_is_one_log_line_and_a_build(
    proxied, fallback_builds, caplog, fault: str
) -> None:
    proxy, node = proxied
    proxy.fault = fault
    caplog.set_level(logging.INFO)
    package = find(node.config)
    [line] = registry_lines(caplog)
    assert line.startswith(f"Registry {proxy.reference}: not using {proxy.reference}:")
    assert FAULTS[fault][0] in line
    assert len(fallback_builds) == 1
    assert node.files() == [package.path.parent, package.path]  # nothing half-written
    proxy.fault = None  # the same node, the registry healthy again: the pull works
    package.path.unlink()
    assert "Pulled" not in caplog.text
    find(node.config)
    assert "Pulled" in caplog.text and len(fallback_builds) == 1


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_registry_fault_when_the_node_cannot_build(proxied, fault: str) -> None:
    """Exit 5 for an integrity failure (a bad manifest or blob), else 1; the message
    names both the build's and the registry's failure; the store stays empty."""
    proxy, node = proxied
    proxy.fault = fault
    # A cut blob is tried again (real waits in this child): a budget of a second or two.
    tool = run_tool("init", env={**node.env, "PRECOMPILED_REGISTRY_RETRY_BUDGET": "1.5"})
    assert tool.returncode == (5 if FAULTS[fault][1] else 1), tool.stderr
    assert "building one failed" in tool.stderr and FAULTS[fault][0] in tool.stderr
    assert node.files() == []


@pytest.mark.parametrize(
    "fault,extra,reason",
    [
        ("down", {}, "connection refused (nothing listening)"),
        ("401", {"PRECOMPILED_REGISTRY_PASSWORD": "wrong"}, "refused the credentials (HTTP 401"),
        ("no credentials", {"PRECOMPILED_REGISTRY_USERNAME": ""}, "none are configured"),
        ("untrusted CA", {"PRECOMPILED_REGISTRY_CA": ""}, "TLS certificate not trusted"),
    ],
)
def test_registry_down_or_refusing_is_one_log_line_and_a_build(
    make_node, fallback_builds, caplog, fault: str, extra: dict[str, str], reason: str
) -> None:
    env = dict(extra)
    if fault == "down":
        env["PRECOMPILED_REGISTRY"] = f"127.0.0.1:{dead_port()}/fleet/nvidia-driver"
    node = make_node("node", **env)
    caplog.set_level(logging.INFO)
    package = find(node.config)
    [line] = registry_lines(caplog)
    assert reason in line and node.config.registry in line
    assert PASSWORD not in caplog.text and "wrong" not in line
    assert len(fallback_builds) == 1
    assert node.files() == [package.path.parent, package.path]


def test_bad_registry_settings_are_usage_errors(make_node) -> None:
    node = make_node("node")
    for env, expected in (
        ({"PRECOMPILED_REGISTRY": "https://r.example/x"}, "PRECOMPILED_REGISTRY (or --pull)="),
        ({"PRECOMPILED_REGISTRY_PUSH": "maybe"}, "PRECOMPILED_REGISTRY_PUSH='maybe'"),
        (
            {"PRECOMPILED_REGISTRY_PUSH": "true", "PRECOMPILED_SIGNING_KEY": ""},
            "PRECOMPILED_REGISTRY_PUSH=true needs PRECOMPILED_SIGNING_KEY",
        ),
    ):
        tool = run_tool("init", env={**node.env, **env})
        assert tool.returncode == 2, tool.stderr
        assert expected in tool.stderr and "Traceback" not in tool.stderr


def test_a_store_that_cannot_be_written_is_a_clear_error(make_node, tmp_path: Path) -> None:
    """A node store that is not a directory (or is full): a DriverError naming it, not a
    traceback, and no temporary file anywhere."""
    a = make_node("a")
    registry.push(a.config, running_package(a), registry.Reference.parse(a.config.registry))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    node = make_node("node", NODE_PRECOMPILED_DIR=str(blocker))
    with pytest.raises(DriverError, match=r"Cannot write the package .* into .*not-a-dir"):
        registry.pull(
            node.config, registry.Reference.parse(node.config.registry), wanted_for(node), blocker
        )
    assert blocker.read_text() == ""


@pytest.mark.parametrize("command", ["init", "load"])
def test_pull_flag_is_the_same_as_the_setting(make_node, command: str) -> None:
    a = make_node("a")
    registry.push(a.config, running_package(a), registry.Reference.parse(a.config.registry))
    node = make_node("node")
    env = {k: v for k, v in node.env.items() if k != "PRECOMPILED_REGISTRY"}
    tool = run_tool(command, "--pull", node.env["PRECOMPILED_REGISTRY"], env=env)
    # Pulled, then the link of the stand-in's plain files fails (they are no objects).
    assert "Pulled nvidia-535.999.01-proprietary.tar.gz from the registry" in tool.stderr
    assert "building one" not in tool.stderr


# --- a rollout wave: a throttled, stumbling registry is waited out within the budget


def pulled_without_building(node: Node, fallback_builds, caplog) -> Package:
    caplog.set_level(logging.INFO)
    package = find(node.config)
    assert fallback_builds == [] and registry_lines(caplog) == []
    assert f"Pulled {package.path.name} from the registry" in caplog.text
    return package


def test_a_throttled_registry_is_waited_out_as_long_as_it_asks(
    proxied, waits, fallback_builds, caplog
) -> None:
    proxy, node = proxied
    proxy.fault, proxy.times, proxy.retry_after = "429", 2, "7"
    pulled_without_building(node, fallback_builds, caplog)
    assert [status for *_, status in proxy.seen[:2]] == [429, 429]
    assert len(waits) == 2 and all(7 <= w <= 7 * 1.25 for w in waits)


def test_a_registry_that_fails_twice_is_tried_again_with_growing_jittered_waits(
    proxied, waits, fallback_builds, caplog
) -> None:
    proxy, node = proxied
    proxy.fault, proxy.times = "503", 2
    pulled_without_building(node, fallback_builds, caplog)
    assert [status for *_, status in proxy.seen[:3]][:2] == [503, 503]
    first, second = waits
    assert 0.5 <= first <= 1 and 1 <= second <= 2  # base 1 s, doubled, jittered by half


def test_a_blob_reset_mid_way_resumes_from_the_byte_reached(
    proxied, waits, fallback_builds, caplog
) -> None:
    proxy, node = proxied
    proxy.fault, proxy.times = "reset", 1
    package = pulled_without_building(node, fallback_builds, caplog)
    blob = [(r, status) for method, path, r, status in proxy.seen if path.endswith(
        f"/blobs/{proxy.package_digest}") and method == "GET"]  # fmt: skip
    size = package.path.stat().st_size
    assert blob == [(None, 200), (f"bytes={size // 2}-", 206)]
    assert len(waits) == 1


def test_a_registry_throttling_beyond_the_budget_is_one_log_line_and_a_build(
    proxied, waits, fallback_builds, caplog
) -> None:
    """Retry-After 40 s (each wait 40-50 s, jittered) against a budget of 120 s: two
    waits, then the node builds, and the one log line names the registry, what failed and
    how often."""
    proxy, node = proxied
    proxy.fault, proxy.retry_after = "429", "40"
    caplog.set_level(logging.INFO)
    find(node.config)
    assert len(fallback_builds) == 1 and len(waits) == 2
    [line] = registry_lines(caplog)
    assert line.startswith(f"Registry {proxy.reference}: not using")
    assert "HTTP 429 Too Many Requests" in line
    assert re.search(r"asks for a wait of 40 s, beyond the budget; HTTP 429 3 times in \d+ s", line)


# --- credentials from Docker credential helpers

HELPER = """#!/bin/sh
# docker-credential-helpers' protocol: `get`, the server on stdin, JSON on stdout.
read -r server
printf '%s' "$server" >> "$0.asked"
[ "$1" = get ] || exit 2
case "$0" in
*failing) echo "keychain locked"; echo "the keychain is locked" >&2; exit 1;;
esac
if [ "$server" = "{host}" ]; then
    printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{secret}"}}' "$server"
else
    echo "credentials not found in native keychain"; exit 1
fi
"""


def helpers_and_auth_file(tmp_path: Path, host: str, document: dict[str, object]) -> dict[str, str]:
    """Helpers `fleet` (knows `host`) and `failing` in a PATH directory, and an auth file:
    the environment for a node that has no credentials of its own."""
    bin_dir = tmp_path / "helpers"
    bin_dir.mkdir()
    for name in ("fleet", "failing"):
        helper = bin_dir / f"docker-credential-{name}"
        helper.write_text(HELPER.format(host=host, user=USER, secret=PASSWORD))
        helper.chmod(0o755)
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps(document))
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "REGISTRY_AUTH_FILE": str(auth),
        "PRECOMPILED_REGISTRY_USERNAME": "",
        "PRECOMPILED_REGISTRY_PASSWORD": "",
    }


@pytest.mark.parametrize("key", ["credHelpers", "credsStore"])
def test_a_credential_helper_gives_the_credentials_and_they_never_appear(
    make_node, keys, tmp_path: Path, key: str
) -> None:
    a = make_node("a")
    registry.push(a.config, running_package(a), registry.Reference.parse(a.config.registry))
    host = a.config.registry.split("/")[0]
    document: dict[str, object] = (
        {"credHelpers": {host: "fleet"}} if key == "credHelpers" else {"credsStore": "fleet"}
    )
    env = {**make_node("b").env, **helpers_and_auth_file(tmp_path, host, document)}
    env["NVIDIA_DRIVER_TEST_PAUSE_AT"] = "linked"
    tool = run_tool("init", "--debug", env=env)
    assert "Pulled nvidia-535.999.01-proprietary.tar.gz from the registry" in tool.stderr
    assert (tmp_path / "helpers" / "docker-credential-fleet.asked").read_text() == host
    assert_no_credentials(tool.stdout + tool.stderr, keys)


@pytest.mark.parametrize(
    "helper,reason",
    [
        ("failing", "docker-credential-failing named by credsStore of {auth} failed for {host}: "
                    "exited with status 1 (the keychain is locked)"),
        ("absent", "docker-credential-absent named by credsStore of {auth} is not installed"),
    ],
)  # fmt: skip
def test_a_failing_or_missing_credential_helper_is_one_clear_log_line_and_a_build(
    make_node, fallback_builds, caplog, tmp_path: Path, monkeypatch, helper: str, reason: str
) -> None:
    host = make_node("a").config.registry.split("/")[0]
    env = helpers_and_auth_file(tmp_path, host, {"credsStore": helper})
    node = make_node("node", **env)
    monkeypatch.setenv("PATH", env["PATH"])
    caplog.set_level(logging.DEBUG)
    find(node.config)
    [line] = registry_lines(caplog)
    assert reason.format(auth=env["REGISTRY_AUTH_FILE"], host=host) in line
    assert len(fallback_builds) == 1
    assert PASSWORD not in caplog.text


# --- older registries, and mirrors made with standard tools


def stored_manifest(node: Node, reference: str, tag: str) -> dict[str, object]:
    client = registry.Client.for_config(node.config, registry.Reference.parse(reference))
    document: dict[str, object] = json.loads(client.get_manifest(tag))
    return document


def test_a_registry_that_refuses_oci_1_1_gets_the_oci_1_0_form_and_it_pulls(
    make_node, reg: Registry, fallback_builds, caplog
) -> None:
    a = make_node("a")
    package = running_package(a)
    tag = wanted_for(a).artifact_tag
    with FaultProxy(reg) as proxy:
        proxy.fault = "refuse-1.1"
        registry.push(a.config, package, registry.Reference.parse(proxy.reference))
    puts = [status for method, path, _, status in proxy.seen if method == "PUT" and
            "/manifests/" in path]  # fmt: skip
    assert puts == [400, 201]
    manifest = stored_manifest(a, reg.reference, tag)
    assert "artifactType" not in manifest
    assert manifest["config"] == {  # ORAS's OCI 1.0 form: the config names the artifact
        "mediaType": registry.ARTIFACT_TYPE,
        "digest": registry.descriptor_of(registry.EMPTY_TYPE, registry.EMPTY).digest,
        "size": 2,
    }
    found = pulled_without_building(make_node("b"), fallback_builds, caplog)
    assert found.path.read_bytes() == package.path.read_bytes()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A second registry: an air-gapped fleet's, filled with skopeo."""
    need(shutil.which("skopeo") is not None, "missing skopeo (Debian's skopeo)")
    with serve_registry(tmp_path_factory.mktemp("mirror")) as server:
        yield server


def skopeo(*argv: str) -> str:
    return subprocess.run(["skopeo", *argv], check=True, capture_output=True, text=True).stdout


def cert_dir(reg: Registry) -> str:
    """skopeo's --cert-dir: a directory of *.crt CA files."""
    path = reg.tls.ca.parent / "certs.d"
    path.mkdir(exist_ok=True)
    shutil.copy(reg.tls.ca, path / "ca.crt")
    return str(path)


def test_skopeo_reads_both_forms_we_push_and_copies_them_to_a_mirror_that_a_node_pulls_from(
    make_node, reg: Registry, mirror: Registry, fallback_builds, caplog
) -> None:
    """The OCI 1.1 form, and the 1.0 form an older registry got: `skopeo inspect --raw`
    reads each as an OCI image manifest with our layers, `skopeo copy` mirrors it, and a
    node pulls, verifies and uses it from the mirror."""
    a = make_node("a")
    package = running_package(a)
    tag = wanted_for(a).artifact_tag
    creds = f"{USER}:{PASSWORD}"
    for form in ("1.1", "1.0"):
        with FaultProxy(reg) as proxy:
            proxy.fault = "refuse-1.1" if form == "1.0" else None
            source = f"{proxy.reference}-{form}"
            registry.push(a.config, package, registry.Reference.parse(source))
        raw = skopeo("inspect", "--raw", "--creds", creds, "--cert-dir", cert_dir(reg),
                     f"docker://{reg.reference}-{form}:{tag}")  # fmt: skip
        manifest = json.loads(raw)
        assert manifest["mediaType"] == registry.MANIFEST_TYPE and manifest["schemaVersion"] == 2
        assert ("artifactType" in manifest) == (form == "1.1")
        assert [d["mediaType"] for d in manifest["layers"]] == [
            registry.PACKAGE_LAYER,
            registry.SIGNATURE_LAYER,
        ]
        skopeo("copy", "--preserve-digests",
               "--src-creds", creds, "--src-cert-dir", cert_dir(reg),
               "--dest-creds", creds, "--dest-cert-dir", cert_dir(mirror),
               f"docker://{reg.reference}-{form}:{tag}",
               f"docker://{mirror.reference}:{tag}")  # fmt: skip
        node = make_node(f"node-{form}", PRECOMPILED_REGISTRY=mirror.reference,
                         PRECOMPILED_REGISTRY_CA=str(mirror.tls.ca))  # fmt: skip
        caplog.clear()
        found = pulled_without_building(node, fallback_builds, caplog)
        assert found.path.read_bytes() == package.path.read_bytes()
        assert f"{mirror.reference}@" in caplog.text


def test_a_port_taken_before_the_registry_binds_it_is_given_up_for_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """free_port's port is free when chosen; another process (an xdist worker's server)
    may take it before docker-registry binds it: serve_registry tries another."""
    import socket

    from tests import registry as test_registry

    missing = tools_missing()
    need(not missing, f"missing {', '.join(missing)} (docker-registry, apache2-utils)")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        first = int(taken.getsockname()[1])
        chosen = iter([first])
        free_port = test_registry.free_port
        monkeypatch.setattr(test_registry, "free_port", lambda: next(chosen, None) or free_port())
        with serve_registry(tmp_path) as server:
            assert server.port != first
            test_registry.wait_for_v2(server.port, server.tls.ca)
