"""The CLI dispatcher: help, usage errors, and that it stays light."""

from __future__ import annotations

import pytest

from bnexport.cli.main import main


def test_help_lists_quickstart(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "quickstart" in capsys.readouterr().out


def test_no_command_prints_help_and_returns_2(capsys):
    assert main([]) == 2
    assert "usage: bnexport" in capsys.readouterr().out


def test_usage_error_is_one_line_without_traceback(capsys):
    assert main(["quickstart", "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "bnexport quickstart: error: --epochs must be >= 1. Received: --epochs=0"


def test_missing_optional_dependency_is_one_line(monkeypatch, capsys):
    import bnexport.cli.cmd_quickstart as cmd

    def needs_fastapi(args):
        raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")

    monkeypatch.setattr(cmd, "run", needs_fastapi)
    assert main(["quickstart"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "bnexport quickstart: error: fastapi is not installed (pip install 'bnexport[serve]')"
    )


@pytest.mark.parametrize(
    "argv", [["--debug", "quickstart", "--epochs", "0"], ["quickstart", "--epochs", "0", "--debug"]]
)
def test_debug_flag_keeps_the_traceback(argv):
    from bnexport.errors import UsageError

    with pytest.raises(UsageError, match="--epochs must be >= 1"):
        main(argv)


def test_debug_environment_variable_keeps_the_traceback(monkeypatch):
    from bnexport.errors import UsageError

    monkeypatch.setenv("BNEXPORT_DEBUG", "1")
    with pytest.raises(UsageError):
        main(["quickstart", "--epochs", "0"])
    monkeypatch.setenv("BNEXPORT_DEBUG", "0")
    assert main(["quickstart", "--epochs", "0"]) == 2


def test_console_script_one_line_then_traceback_with_debug(tmp_path):
    import os
    import subprocess
    import sys

    argv = [sys.executable, "-m", "bnexport.cli.main", "run", str(tmp_path / "no.onnx")]
    argv += ["-i", str(tmp_path / "x.npy")]
    env = {k: v for k, v in os.environ.items() if k != "BNEXPORT_DEBUG"}
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        f"bnexport run: error: ONNX model not found: {tmp_path / 'no.onnx'}"
    ]
    debug = subprocess.run(
        argv, capture_output=True, text=True, env={**env, "BNEXPORT_DEBUG": "1"}, timeout=120
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UsageError" in debug.stderr


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            PermissionError(13, "Permission denied", "/x/y.onnx"),
            (1, "/x/y.onnx: Permission denied"),
        ),
        (FileNotFoundError("ONNX model not found: m.onnx"), (1, "ONNX model not found: m.onnx")),
        (
            ModuleNotFoundError("no", name="tf2onnx"),
            (1, "tf2onnx is not installed (pip install 'bnexport[keras]')"),
        ),
        (ModuleNotFoundError("no", name="bnexport.nope"), None),  # our own module: a bug
        (KeyError("x"), None),  # a bug keeps its traceback
        (KeyboardInterrupt(), (130, "interrupted")),
    ],
)
def test_translate(exc, expected):
    from bnexport.cli.main import translate

    assert translate(exc) == expected


def test_multi_line_messages_become_one_line(monkeypatch, capsys):
    import bnexport.cli.cmd_quickstart as cmd
    from bnexport.errors import ExportError

    def fails(args):
        raise ExportError("first line\n  second line\n")

    monkeypatch.setattr(cmd, "run", fails)
    assert main(["quickstart"]) == 1
    assert capsys.readouterr().err == "bnexport quickstart: error: first line second line\n"
