"""Progress display for long jobs (rich), usable as a Keras callback."""

from __future__ import annotations

from typing import Any


def KerasProgress(epochs: int, description: str) -> Any:  # noqa: N802 - behaves like a class
    """A Keras callback showing one rich progress bar over ``epochs`` with loss/accuracy.

    Built by a factory so that importing this module does not import Keras.
    """
    import keras
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    class _KerasProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(description, total=epochs, metrics="")

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            metrics = "  ".join(f"{k}={v:.4f}" for k, v in logs.items())
            self._progress.update(self._task, advance=1, metrics=metrics)

        def on_train_end(self, logs: dict[str, float] | None = None) -> None:
            self._progress.stop()

    return _KerasProgress()
