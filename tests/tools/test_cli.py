"""The `v2d` command: parser, config handling, one-line errors with exit code 1."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tools.cli import build_parser, main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "config" in out


def test_config_prints_overridden_yaml(capsys):
    assert main(["config", "--set", "gn.iterations=9"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["gn"]["iterations"] == 9


def test_unknown_key_is_one_line_and_exit_1(capsys):
    assert main(["config", "--set", "gn.bogus=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("v2d config: error: unknown config key gn.bogus")


def test_missing_config_file_is_one_line(capsys, tmp_path):
    assert main(["config", "--config", str(tmp_path / "nope.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read config file" in err[0]


def test_console_script_entry_point_runs():
    # The installed console script and `python -m tools.cli` are the same main().
    proc = subprocess.run([sys.executable, "-m", "tools.cli", "config", "--set", "gn.nope=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_parser_builds_without_side_effects():
    assert build_parser().prog == "v2d"


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: COMMAND"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["config", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["demo", "--out"], "argument --out: expected one argument"),
    ],
)
def test_usage_errors_are_one_line_and_exit_1(capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "--help" in err[0]
