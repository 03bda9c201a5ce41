"""The command line of docs/commands.md: every command parses and has --help."""

from __future__ import annotations

import pytest

from nvdriver import cli, flags, lifecycle
from tests.conftest import run_tool

COMMANDS = ["init", "update", "build", "load", "unload", "status", "packages", "validate"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert f"nvidia-driver {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["init", "--bogus"],
        ["update", "-m", "0"],
        ["update", "--max-threads", "many"],
        ["packages", "explode"],
        ["frobnicate"],
        [],
    ],
)
def test_unknown_or_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(cli.ALONE))
def test_a_command_alone_parses_as_argparse_parses_it(command):
    """`init` alone (the container's command) and the others of `cli.ALONE` skip argparse:
    what they get must be what argparse gives them, every attribute and default."""
    assert vars(cli.parse_args([command])) == vars(flags.parser().parse_args([command]))


def test_the_commands_parsed_alone_are_the_ones_a_node_runs_at_each_start_and_stop():
    assert set(cli.ALONE) == {"init", "load", "unload", "status", "packages", "validate"}
    # With a flag, or as a flag's value, a command is argparse's to parse.
    assert cli.parse_args(["init", "--debug"]).debug is True
    assert cli.parse_args(["--debug", "status"]).debug is True
    with pytest.raises(SystemExit):
        cli.parse_args(["--json"])


def test_seed_flags_parse():
    args = cli.parse_args(["init", "-a", "-m", "4"])
    assert (args.accept_license, args.max_threads) == (True, 4)
    args = cli.parse_args(["update", "-k", "6.12.102-flatcar", "-s", "k", "-t", "t"])
    assert (args.kernel, str(args.sign), args.tag) == ("6.12.102-flatcar", "k", "t")


def test_malformed_driver_version_exits_2_with_the_variable_named():
    result = run_tool("status", env={"DRIVER_VERSION": "535.x"})
    assert result.returncode == 2
    assert "DRIVER_VERSION='535.x' is malformed: expected a version like 535.261.03." in (
        result.stderr
    )
    assert "Fix DRIVER_VERSION in the container's environment" in result.stderr
    assert "Traceback" not in result.stderr


def _unexpected(config):
    raise PermissionError(13, "Permission denied", "/somewhere/odd")


@pytest.mark.parametrize("debug", [False, True])
def test_an_unexpected_os_error_is_exit_1_with_one_message_and_a_traceback_only_with_debug(
    monkeypatch, capsys, debug
):
    """The last resort in cli.main, for an OSError no check foresaw (injected here: the
    real ones are each caught where they arise, see tests/integration/test_hostile_env.py)."""
    monkeypatch.setattr(lifecycle, "unload", _unexpected)
    monkeypatch.setenv("HOST_ROOT", "/nonexistent")
    assert cli.main(["unload", *(["--debug"] if debug else [])]) == 1
    err = capsys.readouterr().err
    assert "Unexpected error: [Errno 13] Permission denied: '/somewhere/odd'." in err
    assert "run with --debug" in err
    assert ("Traceback" in err) is debug
