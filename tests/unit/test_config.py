"""Configuration is validated once; a malformed value is a usage error naming it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from nvdriver import cli
from nvdriver.config import Config
from nvdriver.errors import ExitCode, UsageError


@pytest.mark.parametrize(
    ("env", "flags", "named"),
    [
        ({"DRIVER_VERSION": "535"}, {}, "DRIVER_VERSION"),
        ({"DRIVER_VERSION": "535.261.03-1"}, {}, "DRIVER_VERSION"),
        ({"DRIVER_VERSION": "latest"}, {}, "DRIVER_VERSION"),
        ({"DRIVER_VERSION": "535.261.03\n"}, {}, "DRIVER_VERSION"),
        ({"KERNEL_MODULE_TYPE": "closed"}, {}, "KERNEL_MODULE_TYPE"),
        ({"FLATCAR_CHANNEL": "edge"}, {}, "FLATCAR_CHANNEL"),
        ({"FLATCAR_BOARD": "riscv-usr"}, {}, "FLATCAR_BOARD"),
        ({"LOG_FORMAT": "xml"}, {}, "LOG_FORMAT"),
        ({}, {"kernel": "../../etc"}, "--kernel"),
        ({}, {"kernel": "6.1 0"}, "--kernel"),
        ({}, {"kernel": "flatcar"}, "--kernel"),
        ({}, {"tag": "a/b"}, "--tag"),
    ],
)
def test_malformed_setting_is_a_usage_error_naming_it(env, flags, named):
    with pytest.raises(UsageError) as e:
        Config.from_env(env, **flags)
    assert e.value.exit_code == ExitCode.USAGE
    assert named in e.value.message


@pytest.mark.parametrize(
    "release", ["6.12.102-flatcar", "6.1.0-56-amd64", "6.12.113+deb12-amd64", "5.15.0"]
)
def test_real_kernel_releases_are_accepted(release):
    assert Config.from_env({}, kernel=release).kernel == release


def test_defaults_follow_the_driver_version_and_host_root(tmp_path):
    c = Config.from_env({"DRIVER_VERSION": "535.261.03", "HOST_ROOT": str(tmp_path)})
    assert c.driver_source == Path("/usr/src/nvidia-535.261.03")
    assert c.precompiled_dir == Path("/usr/src/nvidia-535.261.03/kernel/precompiled")
    assert c.host("/run/nvidia/driver") == tmp_path / "run/nvidia/driver"
    assert c.node_precompiled_dir == Path("/var/lib/nvidia-driver/precompiled")
    assert c.kernel_module_type == "auto"


def test_container_own_paths_follow_container_root_never_host_root(tmp_path):
    c = Config.from_env(
        {"HOST_ROOT": str(tmp_path / "host"), "CONTAINER_ROOT": str(tmp_path / "root")}
    )
    assert c.own("/opt/nvidia") == tmp_path / "root/opt/nvidia"
    assert c.host("/proc/version") == tmp_path / "host/proc/version"
    assert Config.from_env({"HOST_ROOT": str(tmp_path)}).own("/opt/nvidia") == Path("/opt/nvidia")
    assert c.log_format == "text"


def test_flags_override_the_environment() -> None:
    """PRECOMPILED_REGISTRY and --pull name the same setting: the flag wins."""
    env = {"PRECOMPILED_REGISTRY": "env.example/fleet/x"}
    parse = cli.parse_args
    assert cli.config_from_args(parse(["init"]), env).registry == "env.example/fleet/x"
    flagged = parse(["init", "--pull", "flag.example/fleet/x"])
    assert cli.config_from_args(flagged, env).registry == "flag.example/fleet/x"


ENVIRONMENT_READERS = ("environ", "environb", "getenv", "getenvb")


def test_nothing_but_config_reads_the_environment() -> None:
    """Settings are read once, in config.py, and children get only what it names there: a
    module that reads os.environ (or getenv) itself bypasses both."""
    src = Path(__file__).resolve().parents[2] / "src" / "nvdriver"
    readers = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or path.name == "config.py":
                continue
            if node.attr in ENVIRONMENT_READERS:
                readers.append(f"{path.relative_to(src)}:{node.lineno}")
    assert readers == []
