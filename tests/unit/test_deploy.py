"""The deployment files and the documentation of how to run the driver container.

Each file is checked by the real validator of its format: Ignition's own JSON schema (spec
3.4.0, what Flatcar reads) for the Ignition config made from the Butane config,
`systemd-analyze verify` for the unit, the Kubernetes API schemas (`kubernetes-validate`)
for the DaemonSet, the GPU Operator's ClusterPolicy CRD schema for its Helm values. The
butane binary is not available here: the Butane config is turned into Ignition by a
converter below for the subset it uses, which refuses any other key.

And everything that runs the container gives it the same mounts, the container contract
(docs/paths.md): the unit, the DaemonSet, every `docker run` of the image in the README
and docs/, and the paths doc's own table are each compared with one list, CONTRACT.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from nvdriver.daemons import STOP_TIMEOUT
from nvdriver.mounts import TOOL_TIMEOUT
from nvdriver.rootfs import DAEMONS_STATUS_FILE, READY_FILE
from nvdriver.run import TIMEOUTS
from nvdriver.watch import CHILD_STOP_TIMEOUT
from tests.conftest import need

ROOT = Path(__file__).resolve().parents[2]
FLATCAR = ROOT / "deploy" / "flatcar"
BUTANE = FLATCAR / "nvidia-driver.bu"
UNIT = FLATCAR / "nvidia-driver.service"
DAEMONSET = ROOT / "deploy" / "kubernetes" / "daemonset.yaml"
OPERATOR_VALUES = ROOT / "deploy" / "kubernetes" / "gpu-operator-values.yaml"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DATA = Path(__file__).parent / "data"
IGNITION_SCHEMA = DATA / "ignition-v3_4.schema.json"
# The GPU Operator's ClusterPolicy CRD, spec.driver (data/README.md says from where).
OPERATOR_DRIVER_SCHEMA = DATA / "gpu-operator-clusterpolicy-driver.schema.json"

# The container's mounts (host path, container path, read-only, shared): the container
# contract (docs/paths.md). The one list every deployment file and every documented
# `docker run` of the driver image is compared with.
CONTRACT = (
    ("/run/nvidia", "/run/nvidia", False, True),
    ("/etc/os-release", "/host-etc/os-release", True, False),
    ("/etc/flatcar", "/host-etc/flatcar", True, False),
    ("/usr/share/flatcar", "/host-usr/share/flatcar", True, False),
    ("/lib/modules", "/lib/modules", True, False),
    ("/dev", "/dev", False, False),
    ("/var/lib/nvidia-driver", "/var/lib/nvidia-driver", False, False),
    ("/var/cache/nvidia-driver", "/var/cache/nvidia-driver", False, False),
    ("/etc/nvidia-driver/modules", "/drivers", True, False),
    ("/run/dbus/system_bus_socket", "/run/dbus/system_bus_socket", True, False),
)
Mount = tuple[str, str, bool, bool]
# What a clean shutdown may take at the limits of its steps: a build ahead's cleanup,
# the fabric manager's, nvlsm's and nvidia-persistenced's stops, one rmmod, one unmount.
UNLOAD_BUDGET = CHILD_STOP_TIMEOUT + 3 * STOP_TIMEOUT + TIMEOUTS["rmmod"] + TOOL_TIMEOUT


# --- Butane to Ignition ------------------------------------------------------------------


class UnsupportedButane(Exception):
    """A Butane key the converter does not implement: convert with the real butane."""


def _only(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise UnsupportedButane(f"{where}: {', '.join(sorted(unknown))}")


def _data_url(text: str) -> str:
    """Contents as Butane writes them uncompressed: a percent-encoded `data:` URL."""
    return "data:," + urllib.parse.quote(text, safe="")


def _contents(spec: dict[str, Any], files_dir: Path, where: str) -> str:
    _only(spec, {"inline", "local"}, where)
    if len(spec) != 1:
        raise UnsupportedButane(f"{where}: exactly one of inline, local")
    return str(spec["inline"]) if "inline" in spec else (files_dir / spec["local"]).read_text()


def butane_to_ignition(path: Path, files_dir: Path) -> dict[str, Any]:
    """Butane's flatcar 1.1.0 variant to Ignition 3.4.0, for storage.files,
    storage.directories and systemd.units (what `butane --files-dir` does for them)."""
    config = yaml.safe_load(path.read_text())
    _only(config, {"variant", "version", "storage", "systemd"}, "top level")
    if (config.get("variant"), config.get("version")) != ("flatcar", "1.1.0"):
        raise UnsupportedButane(f"variant {config.get('variant')} {config.get('version')}")
    ignition: dict[str, Any] = {"ignition": {"version": "3.4.0"}}
    storage = config.get("storage", {})
    _only(storage, {"files", "directories"}, "storage")
    out_storage: dict[str, Any] = {}
    for d in storage.get("directories", []):
        _only(d, {"path", "mode"}, f"directory {d.get('path')}")
        out_storage.setdefault("directories", []).append(d)
    for f in storage.get("files", []):
        _only(f, {"path", "mode", "overwrite", "contents"}, f"file {f.get('path')}")
        entry = {k: v for k, v in f.items() if k != "contents"}
        if "contents" in f:
            text = _contents(f["contents"], files_dir, f"file {f['path']} contents")
            entry["contents"] = {"source": _data_url(text)}
        out_storage.setdefault("files", []).append(entry)
    if out_storage:
        ignition["storage"] = out_storage
    systemd = config.get("systemd", {})
    _only(systemd, {"units"}, "systemd")
    for unit in systemd.get("units", []):
        _only(unit, {"name", "enabled", "mask", "contents", "contents_local"}, unit.get("name"))
        entry = {k: v for k, v in unit.items() if k != "contents_local"}
        if "contents_local" in unit:
            entry["contents"] = (files_dir / unit["contents_local"]).read_text()
        ignition.setdefault("systemd", {}).setdefault("units", []).append(entry)
    return ignition


def ignition_errors(config: dict[str, Any]) -> list[str]:
    schema = json.loads(IGNITION_SCHEMA.read_text())
    validator = jsonschema.Draft4Validator(schema)
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(config)]


def test_the_butane_config_makes_a_valid_ignition_3_4_config() -> None:
    config = butane_to_ignition(BUTANE, FLATCAR)
    assert ignition_errors(config) == []
    # The validator is Ignition's schema, not a pass-through: a file mode in the wrong type
    # is refused.
    broken = copy.deepcopy(config)
    broken["storage"]["files"][0]["mode"] = "0644"
    assert any("mode" in e for e in ignition_errors(broken))


def test_the_ignition_config_installs_the_unit_and_its_settings() -> None:
    config = butane_to_ignition(BUTANE, FLATCAR)
    units = {u["name"]: u for u in config["systemd"]["units"]}
    assert set(units) == {UNIT.name, "nvidia.service"}
    # Flatcar's own driver unit would load a second driver: masked.
    assert units["nvidia.service"] == {"name": "nvidia.service", "mask": True}
    unit = units[UNIT.name]
    assert unit["enabled"] is True
    assert unit["contents"] == UNIT.read_text()
    files = {
        f["path"]: urllib.parse.unquote(f["contents"]["source"].removeprefix("data:,"))
        for f in config["storage"]["files"]
    }
    environment_file = directive(UNIT, "Service", "EnvironmentFile")[0]
    assert environment_file in files
    assert "NVIDIA_DRIVER_IMAGE" in env_file(files[environment_file])
    # Module parameters: the directory the unit mounts at /drivers exists.
    directories = {d["path"] for d in config["storage"]["directories"]}
    assert {h for h, c, _, _ in unit_mounts() if c == "/drivers"} <= directories


def test_the_converter_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    """Otherwise a key added to the Butane config could vanish from the Ignition config."""
    config = yaml.safe_load(BUTANE.read_text())
    config["storage"]["links"] = [{"path": "/etc/x", "target": "/etc/y"}]
    (tmp_path / "x.bu").write_text(yaml.safe_dump(config))
    with pytest.raises(UnsupportedButane, match="links"):
        butane_to_ignition(tmp_path / "x.bu", FLATCAR)


# --- the unit ----------------------------------------------------------------------------


def unit_directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, continuation lines joined, in order."""
    out: list[tuple[str, str, str]] = []
    section, pending = "", ""
    for raw in path.read_text().splitlines():
        if not pending and (not raw.strip() or raw.lstrip().startswith(("#", ";"))):
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith("["):
            section = line.strip("[]")
        else:
            key, _, value = line.partition("=")
            out.append((section, key.strip(), value.strip()))
    return out


def directive(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_directives(path) if (s, k) == (section, key)]


def env_file(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#")


# `docker run` options that take a value (as the next word or after `=`), and those that
# do not: what the documented command lines use. Any other option is an error, so that a
# mount given some other way cannot slip past the comparison.
DOCKER_RUN_VALUE_OPTIONS = {
    "--cap-add",
    "--device-cgroup-rule",
    "--gpus",
    "--name",
    "--network",
    "--restart",
    "--runtime",
    "--stop-timeout",
    "--volume",
    "-e",
    "-v",
}
DOCKER_RUN_FLAGS = {"--privileged", "--rm", "-d", "--pid=host"}


@dataclasses.dataclass(frozen=True)
class DockerRun:
    """One `docker run` command line: its options, the image and the command."""

    options: tuple[tuple[str, str | None], ...]
    image: str
    command: tuple[str, ...]

    @classmethod
    def parse(cls, argv: list[str]) -> DockerRun:
        assert argv[:2] == ["docker", "run"], argv
        options: list[tuple[str, str | None]] = []
        words = iter(argv[2:])
        for word in words:
            if not word.startswith("-"):
                return cls(tuple(options), word, tuple(words))
            name, eq, value = word.partition("=")
            if word in DOCKER_RUN_FLAGS:
                options.append((word, None))
            elif name in DOCKER_RUN_VALUE_OPTIONS:
                options.append((name, value if eq else next(words)))
            else:
                raise AssertionError(f"docker run option {word!r} is not known to this test")
        raise AssertionError(f"no image in {argv}")

    def flags(self) -> set[str]:
        return {name for name, _ in self.options}

    def values(self, option: str) -> list[str]:
        return [v for n, v in self.options if n == option and v is not None]

    def mounts(self) -> set[Mount]:
        found = set()
        for value in self.values("-v") + self.values("--volume"):
            host, container, *options = value.split(":")
            opts = set(",".join(options).split(",")) - {""}
            found.add((host, container, "ro" in opts, bool(opts & {"shared", "rshared"})))
        return found


def docker_run() -> DockerRun:
    (start,) = directive(UNIT, "Service", "ExecStart")
    return DockerRun.parse(shlex.split(start))


def unit_mounts() -> set[Mount]:
    return docker_run().mounts()


def test_the_unit_runs_the_driver_container_with_the_contract_mounts() -> None:
    run = docker_run()
    assert {"--privileged", "--pid=host", "--rm"} <= run.flags()
    assert run.command == ("init",)
    assert unit_mounts() == set(CONTRACT)
    # The host directories it mounts for the node's packages and cache are the unit's own
    # (systemd creates them).
    assert directive(UNIT, "Service", "StateDirectory") == ["nvidia-driver"]
    assert directive(UNIT, "Service", "CacheDirectory") == ["nvidia-driver"]
    assert directive(UNIT, "Service", "Restart") == ["on-failure"]
    # Active only once the readiness file exists: what makes Before=/After= mean "loaded".
    (post,) = directive(UNIT, "Service", "ExecStartPost")
    assert str(READY_FILE) in post
    assert "kubelet.service" in directive(UNIT, "Unit", "Before")[0].split()


def _seconds(value: str) -> float:
    units = {"": 1, "s": 1, "min": 60, "m": 60}
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*([a-z]*)", value):
        total += int(number) * units[unit]
    return total


def test_the_stop_timeouts_leave_time_for_a_clean_unload() -> None:
    (stop_timeout,) = map(float, docker_run().values("--stop-timeout"))
    stops = [shlex.split(v) for v in directive(UNIT, "Service", "ExecStop")]
    stops += [
        shlex.split(v.lstrip("-"))
        for v in directive(UNIT, "Service", "ExecStartPre")
        if "stop" in shlex.split(v.lstrip("-"))
    ]
    assert stops
    for stop in stops:
        assert stop[:2] == ["docker", "stop"], stop
        assert float(stop[stop.index("--time") + 1]) == stop_timeout
    assert stop_timeout >= UNLOAD_BUDGET
    # systemd kills what is left after TimeoutStopSec: after docker's own limit, not before.
    assert _seconds(directive(UNIT, "Service", "TimeoutStopSec")[0]) > stop_timeout
    (daemonset,) = [r for r in manifests() if r["kind"] == "DaemonSet"]
    assert daemonset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= stop_timeout


def systemd_analyze_verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of `unit`. Where this machine has no docker.service (no
    container engine is installed as a service here), a stub stands in for it, so the
    unit's Requires=/After= on it resolve; everything else is the host's."""
    env = dict(os.environ)
    if subprocess.run(
        ["systemctl", "cat", "docker.service"], capture_output=True, check=False
    ).returncode:
        stubs = tmp_path / "stubs"
        stubs.mkdir(exist_ok=True)
        (stubs / "docker.service").write_text("[Service]\nExecStart=/bin/true\n")
        env["SYSTEMD_UNIT_PATH"] = f"{stubs}:"  # the trailing ':' keeps the default path
    return subprocess.run(
        ["systemd-analyze", "--man=no", "verify", unit],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze (Debian: systemd)")
    # The unit runs docker from systemd's search path, as on Flatcar (/usr/bin/docker).
    need(shutil.which("docker") is not None, "the docker client (Debian: docker.io)")
    result = systemd_analyze_verify(UNIT, tmp_path)
    # verify exits 0 on directives it ignores: any line it prints is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # And it does find them: the same unit with an invalid restart policy is reported.
    broken = tmp_path / UNIT.name
    broken.write_text(UNIT.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    result = systemd_analyze_verify(broken, tmp_path)
    assert "sometimes" in result.stdout + result.stderr


# --- Kubernetes ----------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]


def daemonset_mounts(daemonset: dict[str, Any]) -> set[Mount]:
    pod = daemonset["spec"]["template"]["spec"]
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    (container,) = pod["containers"]
    return {
        (
            volumes[m["name"]],
            m["mountPath"],
            bool(m.get("readOnly")),
            m.get("mountPropagation") == "Bidirectional",
        )
        for m in container["volumeMounts"]
    }


def test_the_daemonset_passes_the_kubernetes_schemas() -> None:
    version = kubernetes_validate.latest_version()
    for resource in manifests():
        kubernetes_validate.validate(resource, version, strict=True)
    # Strict: a misspelt field is an error, not ignored.
    (daemonset,) = [r for r in manifests() if r["kind"] == "DaemonSet"]
    broken = copy.deepcopy(daemonset)
    broken["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_daemonset_honours_the_operator_contract() -> None:
    (daemonset,) = [r for r in manifests() if r["kind"] == "DaemonSet"]
    assert daemonset_mounts(daemonset) == set(CONTRACT) == unit_mounts()
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["hostPID"] is True
    assert container["securityContext"]["privileged"] is True
    assert container["args"] == ["init"]
    assert any("10de" in key for key in pod["nodeSelector"])
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # The same image as the Flatcar unit's settings.
    image = env_file((FLATCAR / "nvidia-driver.env").read_text())["NVIDIA_DRIVER_IMAGE"]
    assert container["image"] == image


# --- the GPU Operator's startup probe and preStop, run ---------------------------------------
# In a mount namespace of the test's own: a tmpfs over /sys/module holds the driver's refcnt
# (no NVIDIA module can load here) and one over /run the Operator's files; nvidia-smi is a
# stand-in (it needs a GPU) that passes or fails as asked.

_POD = r"""
set -e
mount -t tmpfs probe-sys-module /sys/module
mount -t tmpfs probe-run /run
mkdir -p "${STATUS_FILE%/*}"
if [ -n "$LOADED" ]; then mkdir /sys/module/nvidia; echo 1 >/sys/module/nvidia/refcnt; fi
if [ -n "$STATUS" ]; then printf %s "$STATUS" >"$STATUS_FILE"; fi
if [ -n "$READY" ]; then printf 'GDRCOPY_ENABLED: false\n' >"$READY_FILE"; fi
"$@" && echo "command passed" || echo "command failed: $?"
ls -A "${STATUS_FILE%/*}"
"""


def in_pod(
    tmp_path: Path, command: list[str], *, loaded: bool, status: str, smi: bool, ready: bool
) -> tuple[bool, list[str]]:
    """Whether `command` passes on a node in this state, and the validations left after."""
    need(shutil.which("unshare") is not None and os.geteuid() == 0, "unshare, root")
    smi_standin = tmp_path / "bin" / "nvidia-smi"
    smi_standin.parent.mkdir(exist_ok=True)
    smi_standin.write_text(f"#!/bin/sh\nexit {0 if smi else 9}\n")
    smi_standin.chmod(0o755)
    env = {
        "PATH": f"{smi_standin.parent}:/usr/sbin:/usr/bin:/sbin:/bin",
        "STATUS_FILE": str(DAEMONS_STATUS_FILE),
        "READY_FILE": str(READY_FILE),
        "LOADED": "1" if loaded else "",
        "STATUS": status,
        "READY": "1" if ready else "",
    }
    unshare = ["unshare", "--mount", "--propagation", "private"]
    out = subprocess.run(
        [*unshare, "sh", "-c", _POD, "pod", *command],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.splitlines()
    (verdict,) = [line for line in out if line.startswith("command ")]
    return verdict == "command passed", out[out.index(verdict) + 1 :]


def pod_container() -> dict[str, Any]:
    (daemonset,) = [r for r in manifests() if r["kind"] == "DaemonSet"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


@pytest.mark.parametrize(
    ("loaded", "status", "smi", "ready", "passes"),
    [
        (False, "", True, True, False),  # no driver loaded
        (True, "NotReady", True, True, False),  # the daemons do not run yet
        (True, "Ready", False, True, False),  # nvidia-smi fails
        (True, "Ready", True, False, False),  # init has not announced it
        (True, "Ready", True, True, True),
        (True, "", True, True, True),  # no daemons' status file: not required
    ],
)
def test_the_startup_probe_is_the_gpu_operators(
    tmp_path: Path, loaded: bool, status: str, smi: bool, ready: bool, passes: bool
) -> None:
    probe = pod_container()["startupProbe"]
    assert probe["timeoutSeconds"] >= 60  # nvidia-smi's time, as the Operator gives it
    command = probe["exec"]["command"]
    passed, _ = in_pod(tmp_path, command, loaded=loaded, status=status, smi=smi, ready=ready)
    assert passed is passes


def test_the_prestop_removes_both_of_the_gpu_operators_files(tmp_path: Path) -> None:
    command = pod_container()["lifecycle"]["preStop"]["exec"]["command"]
    left = in_pod(tmp_path, command, loaded=True, status="Ready", smi=True, ready=True)
    assert left == (True, [])


def test_the_unit_removes_the_gpu_operators_files_a_killed_container_left() -> None:
    """Before it waits for readiness (a stale file would end the wait at once) and after
    the container is gone (docker kills it at its stop limit)."""
    removal = ["rm", "-f", str(READY_FILE), str(DAEMONS_STATUS_FILE)]
    assert removal in [shlex.split(v) for v in directive(UNIT, "Service", "ExecStartPre")]
    assert [shlex.split(v) for v in directive(UNIT, "Service", "ExecStopPost")] == [removal]


# --- the GPU Operator's values --------------------------------------------------------------


def crd_errors(obj: object, schema: dict[str, Any], where: str) -> list[str]:
    """`obj` against a CRD's OpenAPI v3 schema: types, enums and bounds (jsonschema; the
    keywords it shares with draft 4), and every field the schema does not declare, which the
    API server would drop without a word (a structural schema prunes unknown fields)."""
    validator = jsonschema.Draft4Validator(schema)
    errors = [
        f"{where}.{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)
    ]

    def undeclared(value: object, sub: dict[str, Any], path: str) -> None:
        if isinstance(value, dict) and "properties" in sub:
            for key, item in value.items():
                if key in sub["properties"]:
                    undeclared(item, sub["properties"][key], f"{path}.{key}")
                elif not sub.get("additionalProperties"):
                    errors.append(f"{path}.{key}: not a field of the schema")
        elif isinstance(value, list) and isinstance(sub.get("items"), dict):
            for i, item in enumerate(value):
                undeclared(item, sub["items"], f"{path}[{i}]")

    undeclared(obj, schema, where)
    return errors


def test_the_gpu_operator_values_fit_the_clusterpolicy_schema() -> None:
    values = yaml.safe_load(OPERATOR_VALUES.read_text())
    # Only sections this test checks: the chart passes `driver` through to the
    # ClusterPolicy's spec.driver field by field.
    assert set(values) == {"driver"}
    schema = json.loads(OPERATOR_DRIVER_SCHEMA.read_text())
    assert crd_errors(values["driver"], schema, "driver") == []
    # The operator runs no driver pod of its own: this repository's DaemonSet is the driver.
    assert values["driver"]["enabled"] is False
    # The check is the schema's, not a pass-through: a wrong type and a misspelt field fail.
    assert crd_errors({"enabled": "false"}, schema, "driver")
    assert crd_errors({"enabled": False, "startupProbe": {"periodSecond": 10}}, schema, "driver")


# --- the documentation -------------------------------------------------------------------


def documented_docker_runs(path: Path) -> list[DockerRun]:
    """The `docker run` command lines of a Markdown file's code blocks (indented or fenced),
    or of a Dockerfile's comments; continuation lines joined, each split as the shell would."""
    dockerfile = path.name == "Dockerfile"
    lines, pending, fenced = [], "", False
    for line in path.read_text().splitlines():
        if dockerfile:
            line = "    " + line[1:].strip() if line.startswith("#") else ""
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")):
            pending = ""
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        lines.append(text)
    return [
        DockerRun.parse(shlex.split(text, comments=True))
        for text in lines
        if text.startswith("docker run ")
    ]


def documented_driver_runs() -> dict[Path, list[DockerRun]]:
    """Every `docker run` of the driver image (an image named nvidia-driver) in the docs and
    in the Dockerfile's comments."""
    return {
        path: [
            run
            for run in documented_docker_runs(path)
            if run.image.split("/")[-1].split(":")[0] == "nvidia-driver"
        ]
        for path in [*DOCS, ROOT / "Dockerfile"]
    }


def test_the_documented_docker_runs_use_the_contract_mounts() -> None:
    runs = documented_driver_runs()
    # The README's plain Docker run, the seed's update (privileged, and with the capability
    # flags of a host that refuses --privileged) and the committed image's run; the paths doc.
    assert len(runs[ROOT / "README.md"]) == 4
    assert len(runs[ROOT / "docs" / "paths.md"]) == 1
    for path, found in runs.items():
        for run in found:
            assert run.mounts() == set(CONTRACT), (path.name, run.image, run.command)
            privileged = "--privileged" in run.flags()
            # Without --privileged only the loop-device flags that work there (docs).
            assert privileged or (
                set(run.values("--cap-add")) >= {"SYS_ADMIN", "MKNOD"}
                and "b 7:* rmw" in run.values("--device-cgroup-rule")
            ), (path.name, run.command)
            if privileged:
                assert "--pid=host" in run.flags(), (path.name, run.command)


def test_the_docs_parser_sees_a_mount_that_is_missing(tmp_path: Path) -> None:
    """The comparison above can fail: a README whose run lacks one mount is caught."""
    readme = (ROOT / "README.md").read_text()
    broken = tmp_path / "README.md"
    broken.write_text(readme.replace("        -v /dev:/dev \\\n", "", 1))
    (run, *_) = documented_docker_runs(broken)
    assert set(CONTRACT) - run.mounts() == {("/dev", "/dev", False, False)}


def test_the_docs_link_only_what_is_in_the_repository() -> None:
    """Operators have the repository, not the sessions' shared notes: every relative link
    of the README and docs/ resolves inside it."""
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target:
                continue
            resolved = (path.parent / target).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), (path.name, target)


def test_the_mount_tables_list_the_contract_mounts() -> None:
    """The tables of the mounts (host path, path in the container, mode) in the README and
    docs/paths.md say what the one list says."""
    for path in (ROOT / "README.md", ROOT / "docs" / "paths.md"):
        text = path.read_text()
        table = text[text.index("| host path | in the container | mode |") :].split("\n\n")[0]
        rows = [
            [cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]
        ]
        documented = {
            (
                host.strip("`"),
                container.strip("`"),
                mode.startswith("read-only"),
                "rshared" in mode,
            )
            for host, container, mode, _ in rows
        }
        assert documented == set(CONTRACT), path.name
