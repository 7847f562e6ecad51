"""Progress display for long jobs (rich), on a terminal only.

The library reports progress through a plain callback, ``progress(step, done, total)``
(``step`` names what runs now, ``done`` of ``total`` steps are finished), and never
imports this module. The command line turns that callback into one rich progress bar
on stderr, shown only when stderr is a terminal and ``-q`` was not given
(:func:`bnexport.cli.options.wants_progress`), and removed when the job ends, so piped
output and logs stay clean.
"""

from __future__ import annotations

from typing import Any


class StageProgress:
    """A context manager whose value is the library's ``progress`` callback (or ``None``).

    Args:
        description: what the bar is for (``"export"``, ``"parity"``, ...).
        enabled: show a bar; ``False`` makes the context's value ``None`` (no callback,
            nothing imported, nothing printed).
    """

    def __init__(self, description: str, *, enabled: bool) -> None:
        self.description = description
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[step]}"),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=None, step="")
        return self.update

    def update(self, step: str, done: int, total: int | None) -> None:
        """The callback: ``step`` runs now, ``done`` of ``total`` steps are finished."""
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total, step=step)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
