"""Loading a model must not run its code: Lambda ``.h5`` / SavedModel / ``.keras`` fixtures.

Each fixture's ``Lambda`` layer holds a Python ``lambda`` whose only effect is to create a
marker file when it runs (Keras runs it while rebuilding the model, i.e. while loading).
Safe mode (the default of every loader: Python API, ``export``, ``parity``) must refuse
the file with one line naming the layer and the opt-in, and the marker must not exist;
with the opt-in (``safe_mode=False`` / ``--unsafe-load``) the file loads and exports.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import pytest
import tf_keras

import bnexport
from bnexport.cli.main import main
from bnexport.errors import UnsafeModelError
from bnexport.export.loaders import load_model


def _marker_lambda(marker: Path):
    # a real lambda (marshalled bytecode in the file), not a named function
    return eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]")  # noqa: S307


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("lambda_models")
    marker = root / "MARKER"
    inp = tf_keras.Input((6, 6, 2), name="image")
    x = tf_keras.layers.Conv2D(3, 3, name="conv")(inp)
    x = tf_keras.layers.BatchNormalization(name="bn")(x)
    x = tf_keras.layers.Lambda(_marker_lambda(marker), name="evil")(x)
    model = tf_keras.Model(inp, x, name="tfk")
    h5, saved = root / "m.h5", root / "saved_model"
    model.save(h5)
    model.save(saved, save_format="tf")

    k_in = keras.Input((6, 6, 2), name="image")
    k = keras.layers.Conv2D(3, 3, name="conv")(k_in)
    k = keras.layers.BatchNormalization(name="bn")(k)
    k = keras.layers.Lambda(_marker_lambda(marker), name="evil")(k)
    keras_path = root / "m.keras"
    keras.Model(k_in, k, name="k3").save(keras_path)

    assert marker.exists()  # building the models ran the lambda: the marker works
    marker.unlink()
    return {"h5": h5, "saved_model": saved, "keras": keras_path, "marker": marker}


FORMATS = ["h5", "saved_model", "keras"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_safe_mode_refuses_lambda_without_running_it(fixtures, fmt):
    marker = fixtures["marker"]
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafeModelError) as info:
        load_model(fixtures[fmt])
    message = str(info.value)
    assert "\n" not in message
    assert "'evil'" in message  # names the layer
    assert "safe_mode=False" in message and "--unsafe-load" in message
    assert not marker.exists(), "the Lambda's code ran while loading"


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_api_is_safe_by_default_and_opt_in_loads(fixtures, fmt, tmp_path):
    marker = fixtures["marker"]
    marker.unlink(missing_ok=True)
    out = tmp_path / "m.onnx"
    with pytest.raises(UnsafeModelError):
        bnexport.export(fixtures[fmt], out)
    assert not marker.exists() and not out.exists()

    report = bnexport.export(fixtures[fmt], out, safe_mode=False)
    assert out.exists() and report.verify is not None and report.verify.passed
    assert [r.action for r in report.records] == ["folded_forward"]
    marker.unlink(missing_ok=True)


@pytest.mark.parametrize("fmt", ["h5", "saved_model"])
def test_cli_export_and_parity_refuse_then_opt_in(fixtures, fmt, tmp_path, capsys):
    marker = fixtures["marker"]
    marker.unlink(missing_ok=True)
    src, out = str(fixtures[fmt]), tmp_path / "m.onnx"
    assert main(["export", src, "-o", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "'evil'" in err and "--unsafe-load" in err
    assert not marker.exists() and not out.exists()

    assert main(["export", src, "-o", str(out), "--unsafe-load"]) == 0
    assert out.exists()
    marker.unlink(missing_ok=True)
    capsys.readouterr()

    assert main(["parity", src, str(out), "--samples", "2"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'evil'" in err and "--unsafe-load" in err
    assert not marker.exists()
    assert main(["parity", src, str(out), "--samples", "2", "--unsafe-load"]) == 0
    marker.unlink(missing_ok=True)


def test_check_parity_accepts_one_array_and_is_safe(fixtures, tmp_path):
    """``check_parity(path, onnx, inputs=x)``: safe mode, and a bare array as the feed."""
    import numpy as np

    marker = fixtures["marker"]
    out = tmp_path / "m.onnx"
    bnexport.export(fixtures["h5"], out, safe_mode=False)
    marker.unlink(missing_ok=True)
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 2)).astype(np.float32)
    with pytest.raises(UnsafeModelError):
        bnexport.check_parity(fixtures["h5"], out, inputs=x)
    assert not marker.exists()
    report = bnexport.check_parity(fixtures["h5"], out, inputs=x, safe_mode=False)
    assert bool(report)
    marker.unlink(missing_ok=True)


def test_marker_lambda_really_runs_on_unsafe_load(fixtures):
    """The fixture can fail: an unsafe load does run the code (so its absence means safety)."""
    marker = fixtures["marker"]
    marker.unlink(missing_ok=True)
    load_model(fixtures["h5"], safe_mode=False)
    assert marker.exists()
    marker.unlink()
    assert os.fspath(fixtures["h5"]).endswith(".h5")
