"""The command line of SPEC.md section 2: every command parses and has --help."""

from __future__ import annotations

import pytest

from nvdriver import cli

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


def test_seed_flags_parse():
    args = cli.parser().parse_args(["init", "-a", "-m", "4"])
    assert (args.accept_license, args.max_threads) == (True, 4)
    args = cli.parser().parse_args(["update", "-k", "6.12.102-flatcar", "-s", "k", "-t", "t"])
    assert (args.kernel, str(args.sign), args.tag) == ("6.12.102-flatcar", "k", "t")


def test_malformed_driver_version_exits_2_with_the_variable_named(monkeypatch, caplog):
    monkeypatch.setenv("DRIVER_VERSION", "535.x")
    assert cli.main(["status"]) == 2
