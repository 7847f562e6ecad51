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
    assert main(["quickstart"]) == 2  # a missing extra is an unusable request
    err = capsys.readouterr().err.strip()
    assert err == (
        'bnexport quickstart: error: fastapi is not installed (pip install "bnexport[serve]")'
    )


@pytest.mark.parametrize(
    "argv", [["--debug", "quickstart", "--epochs", "0"], ["quickstart", "--epochs", "0", "--debug"]]
)
def test_debug_flag_prints_the_traceback_and_keeps_the_code(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UsageError" in err
    assert err.rstrip().splitlines()[-1] == (
        "bnexport quickstart: error: --epochs must be >= 1. Received: --epochs=0"
    )


def test_debug_environment_variable_prints_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("BNEXPORT_DEBUG", "1")
    assert main(["quickstart", "--epochs", "0"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("BNEXPORT_DEBUG", "0")
    assert main(["quickstart", "--epochs", "0"]) == 2
    assert "Traceback" not in capsys.readouterr().err


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
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "UsageError" in debug.stderr


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            PermissionError(13, "Permission denied", "/x/y.onnx"),
            (2, "/x/y.onnx: Permission denied"),
        ),
        (FileNotFoundError("ONNX model not found: m.onnx"), (2, "ONNX model not found: m.onnx")),
        (
            OSError(28, "No space left on device", "/x/y.onnx"),
            (1, "/x/y.onnx: No space left on device"),
        ),
        (OSError("no file, no reason"), None),
        (
            ModuleNotFoundError("no", name="tf2onnx"),
            (2, 'tf2onnx is not installed (pip install "bnexport[keras]")'),
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


def test_exit_codes_come_from_one_table():
    """Every expected error type gets its code from bnexport.errors.EXIT_CODES."""
    from bnexport import errors
    from bnexport.cli.main import translate
    from bnexport.serve.protocol.errors import ListenError

    cases = {
        errors.UsageError("x"): 2,
        errors.FileMissingError("x"): 2,
        errors.SignatureMismatchError("x"): 2,
        errors.MissingExtraError("needs tensorrt", name="tensorrt"): 2,
        errors.BackendUnavailableError("no GPU"): 2,
        errors.UnsafeModelError("x"): 2,
        errors.InputError("x"): 2,
        errors.CalibrationError("x"): 2,
        ListenError("cannot listen"): 2,
        errors.ExportError("x"): 1,
        errors.VerificationError("x"): 1,
        errors.FoldError("x"): 1,
        errors.QuantizeError("x"): 1,
    }
    for exc, code in cases.items():
        assert errors.exit_code(exc) == code, exc
        assert translate(exc) == (code, "x" if str(exc) == "x" else str(exc))


def test_every_command_takes_quiet_verbose_and_debug():
    from bnexport.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"export", "fold", "quantize", "run", "parity", "serve"}
    for name, cmd in sub.choices.items():
        for flag in ("-q", "--quiet", "-v", "--verbose", "--debug"):
            assert flag in cmd._option_string_actions, (name, flag)


def test_shared_options_have_one_help_text():
    """--fused-norm, --keep-float16-overflow, --backend ... are declared once."""
    from bnexport.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for flag, commands in {
        "--fused-norm": ("export", "fold"),
        "--keep-float16-overflow": ("export", "fold"),
        "--unsafe-load": ("export", "parity"),
        "--precision": ("run", "serve", "parity"),
        "--json": ("export", "fold", "quantize", "parity"),
        "--inputs": ("run", "parity"),
        "--atol": ("export", "parity"),
        "--range-rtol": ("export", "parity"),
    }.items():
        helps = {sub[c]._option_string_actions[flag].help for c in commands}
        assert len(helps) == 1, (flag, helps)
    for name in ("run", "serve"):
        assert sub[name]._option_string_actions["--backend"].choices == (
            "auto",
            "onnxruntime",
            "tensorrt",
        )
    for name, cmd in sub.items():  # the positional model argument is MODEL everywhere
        positional = [a for a in cmd._actions if not a.option_strings and a.dest != "help"]
        if positional:
            assert positional[0].metavar == "MODEL", name


def test_tolerance_help_states_the_policy_defaults():
    """The defaults --help prints are the rows of bnexport.tolerance."""
    from bnexport.cli.options import TOLERANCE_DEFAULTS
    from bnexport.tolerance import default_tolerance

    rows = []
    for precision in ("float32", "float16"):
        tol = default_tolerance(precision)
        rows.append(f"{precision} {tol.rtol:.0e} / {tol.atol:.0e} / {tol.range_rtol:.0e}")
    assert TOLERANCE_DEFAULTS == ", ".join(rows).replace("e-0", "e-")


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["run", "m.onnx", "-i", "x.npy"], "inputs", "x.npy"),
        (["run", "m.onnx", "--input", "x.npy"], "inputs", "x.npy"),
        (["parity", "m.keras", "m.onnx", "--report", "r.json"], "json", "r.json"),
    ],
)
def test_old_spellings_stay_accepted(argv, dest, value):
    from bnexport.cli.main import build_parser

    assert getattr(build_parser().parse_args(argv), dest) == value


def test_messages_use_option_spelling(monkeypatch, capsys):
    import bnexport.cli.cmd_quickstart as cmd
    from bnexport.errors import QuantizeError

    def fails(args):
        raise QuantizeError("measured on calibration data; pass validation= for held-out data")

    monkeypatch.setattr(cmd, "run", fails)
    assert main(["quickstart"]) == 1
    err = capsys.readouterr().err
    assert "--validation DATA" in err and "validation=" not in err


def test_input_shape_parsing():
    from bnexport.cli.options import parse_input_shapes
    from bnexport.errors import UsageError

    assert parse_input_shapes(["image:1x224x224x3", "mask:-1x7"]) == {
        "image": (1, 224, 224, 3),
        "mask": (None, 7),
    }
    assert parse_input_shapes(["2x8"]) == {"": (2, 8)}
    for bad in ("image:", "image:1xax3", "image:0x3", "a:1x2 ", ""):
        if bad.strip() == "a:1x2":
            continue
        with pytest.raises(UsageError, match="--input-shape"):
            parse_input_shapes([bad])
