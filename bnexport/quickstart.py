"""The main job on the built-in default: train, save, export, verify a digits CNN.

``bnexport quickstart`` runs :func:`run_quickstart`: it trains a small CNN built
with :class:`bnexport.BatchNormalization` on scikit-learn's digits (nothing to
download), reports test accuracy, saves ``digits.keras``, exports
``digits.onnx`` with the batch norms folded, and checks parity of the ONNX graph
against the Keras model, per output and per layer (terminal table + HTML report).
Between training and saving, :func:`bnexport.recalibrate` replaces the moving
statistics that the short training left behind with exact population statistics.
Last, ``digits.onnx`` is quantized to ``digits.int8.onnx`` (:func:`bnexport.quantize`,
calibrated on training images, with the target picked for this CPU: see
:func:`bnexport.quantize.quickstart_step.choose_target`) and both graphs' test accuracy
and latency are printed, with the INT8 graph's quantization and kernel errors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bnexport.data.digits import DigitsSplit, load_digits

#: ``progress(step, done, total)``: ``step`` runs now, ``done`` of ``total`` are finished
ProgressFn = Callable[[str, int, "int | None"], None]


@dataclasses.dataclass
class QuickstartResult:
    """Paths and figures of one quickstart run."""

    keras_path: Path
    onnx_path: Path | None
    test_accuracy: float
    ema_test_accuracy: float = float("nan")
    export_report: Any = None
    parity_report: Any = None
    html_path: Path | None = None
    int8: Any = None  # bnexport.quantize.quickstart_step.Int8Result


def build_digits_model(seed: int = 0) -> Any:
    """A small CNN for ``[N, 8, 8, 1]`` digits with a BN after every linear layer.

    Layout: (Conv3×3 → BN → ReLU) ×2 → MaxPool → Conv3×3 → BN → ReLU →
    GlobalAvgPool → Dense(32) → BN → ReLU → Dense(10) logits.
    """
    import keras

    from bnexport.layers.batch_normalization import BatchNormalization

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="image")
    x = inputs
    for i, filters in enumerate((16, 32)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(64, 3, padding="same", use_bias=False, name="conv2")(x)
    x = BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(32, name="fc")(x)
    x = BatchNormalization(name="bn_fc")(x)
    x = keras.layers.ReLU(name="relu_fc")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def _epoch_callback(progress: ProgressFn, epochs: int) -> Any:
    """A Keras callback that reports each finished epoch to ``progress``."""
    import keras

    class _EpochProgress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            metrics = "  ".join(f"{k}={v:.4f}" for k, v in logs.items())
            progress(f"training digits CNN  {metrics}", epoch + 1, epochs)

    return _EpochProgress()


def train_digits(
    data: DigitsSplit,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> tuple[Any, float]:
    """Train :func:`build_digits_model` with Adam; return ``(model, test_accuracy)``.

    ``progress(step, done, total)`` is called after each epoch (``done`` epochs of
    ``total``), with the epoch's loss and accuracy in ``step``.
    """
    import keras

    model = build_digits_model(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        data.x_train,
        data.y_train,
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=0,
        callbacks=[] if progress is None else [_epoch_callback(progress, epochs)],
    )
    _, accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)
    return model, float(accuracy)


def run_quickstart(
    out_dir: str | os.PathLike[str] = "bnexport-out",
    *,
    epochs: int = 10,
    seed: int = 0,
    export: bool = True,
    html: bool = True,
    console: Any = None,
    progress: ProgressFn | None = None,
) -> QuickstartResult:
    """Train, save, export and verify the digits model under ``out_dir``.

    Args:
        out_dir: folder for ``digits.keras``, ``digits.onnx``, the reports.
        epochs: training epochs.
        seed: seed of the data split and the weights.
        export: export and check parity after training (else stop after saving).
        html: write the parity HTML report.
        console: a ``rich`` console for the results (default: a new one).
        progress: ``progress(step, done, total)``, called after each training epoch and
            each export stage (the command line draws it as a bar on a terminal).

    Returns:
        A :class:`QuickstartResult`; every file is written atomically.
    """
    from rich.console import Console

    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits(seed=seed)
    console.print(
        f"[bold]digits[/bold]: {len(data.y_train)} train / {len(data.y_test)} test images, 8×8"
    )
    model, ema_accuracy = train_digits(data, epochs=epochs, seed=seed, progress=progress)
    console.print(f"test accuracy with the EMA statistics of training: {ema_accuracy:.2%}")
    # A short training leaves the moving averages (momentum 0.99) far from the population
    # statistics; precise-BN recalibration replaces them with exact averages.
    from bnexport.layers.recalibrate import recalibrate

    recalibrate(model, data.x_train, batch_size=64)
    _, accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)
    accuracy = float(accuracy)
    console.print(f"test accuracy after bnexport.recalibrate: [bold]{accuracy:.2%}[/bold]")

    keras_path = out / "digits.keras"
    _save_keras_atomically(model, keras_path)
    console.print(f"saved {keras_path}")
    result = QuickstartResult(
        keras_path=keras_path,
        onnx_path=None,
        test_accuracy=accuracy,
        ema_test_accuracy=ema_accuracy,
    )
    if not export:
        return result

    from bnexport.export.keras_export import export as export_model

    onnx_path = out / "digits.onnx"
    report = export_model(model, onnx_path, progress=progress)
    console.print(report.summary_view())
    console.print(f"exported {onnx_path}")
    result.onnx_path, result.export_report = onnx_path, report

    from bnexport.parity.check import check_parity

    parity = check_parity(
        model, onnx_path, inputs={model.inputs[0].name: data.x_test}, per_layer=True
    )
    console.print(parity.table())
    result.parity_report = parity
    if html:
        result.html_path = out / "parity.html"
        parity.write_html(result.html_path)
        console.print(f"parity report: {result.html_path}")

    from bnexport.quantize.quickstart_step import int8_step

    result.int8 = int8_step(onnx_path, data, out, console)
    return result


def _save_keras_atomically(model: Any, path: Path) -> None:
    """Save ``model`` to ``path`` through a temporary file in the same directory."""
    from bnexport.atomic_write import atomic_path

    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
