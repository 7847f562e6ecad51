"""The CLI dispatcher: help, usage errors, and that it stays light."""

from __future__ import annotations

import subprocess
import sys

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


@pytest.mark.parametrize(
    "code",
    [
        "import bnexport",
        "from bnexport.cli.main import build_parser; build_parser()",
        "import bnexport.errors, bnexport_plugins.fused_norm.spec",
    ],
)
def test_light_imports_do_not_load_tensorflow(code):
    probe = f"{code}; import sys; print('tensorflow' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False"], f"{code!r} imported heavy modules: {out}"


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
