"""Progress: a plain callback in the library, a rich bar on a terminal in the CLI only."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

import bnexport
from bnexport.cli.options import wants_progress
from bnexport.cli.progress import StageProgress


def _imports(module_file: Path) -> set[str]:
    tree = ast.parse(module_file.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("module", ["quickstart.py", "export/keras_export.py"])
def test_library_never_imports_the_cli(module):
    path = Path(bnexport.__file__).parent / module
    assert not any(name.startswith("bnexport.cli") for name in _imports(path))


def test_progress_only_on_a_terminal_and_not_quiet(monkeypatch):
    import sys

    args = argparse.Namespace(quiet=0, verbose=0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not wants_progress(args)  # piped: quiet
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert wants_progress(args)
    assert not wants_progress(argparse.Namespace(quiet=1, verbose=0))


def test_disabled_progress_is_no_callback():
    with StageProgress("export", enabled=False) as progress:
        assert progress is None


def test_enabled_progress_tracks_the_callback():
    stage = StageProgress("export", enabled=True)
    with stage as progress:
        progress("loading the model", 0, 5)
        progress("writing", 4, 5)
        task = stage._progress.tasks[0]  # noqa: SLF001 - the bar's state
        assert (task.completed, task.total, task.fields["step"]) == (4, 5, "writing")
    assert stage._progress is None  # noqa: SLF001 - stopped: the transient bar is gone


def test_training_reports_each_epoch():
    from bnexport.data.digits import load_digits
    from bnexport.quickstart import train_digits

    calls = []
    train_digits(load_digits(seed=0), epochs=2, progress=lambda *a: calls.append(a))
    assert [(c[1], c[2]) for c in calls] == [(1, 2), (2, 2)]
    assert all(c[0].startswith("training digits CNN") and "loss=" in c[0] for c in calls)
