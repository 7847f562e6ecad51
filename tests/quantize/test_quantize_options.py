"""The quantizer's keyword options live in one place (``QuantizeSettings``).

``bnexport.quantize``, ``quantize_model`` and the ``bnexport quantize`` command all take
the same options; a misspelt one fails before any work, and the CLI passes nothing the
library does not know.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import bnexport
from bnexport.cli.main import main
from bnexport.quantize import QuantizeSettings, quantize_model


def test_unknown_option_fails_before_any_work(tmp_path):
    with pytest.raises(TypeError, match="methd"):
        bnexport.quantize(tmp_path / "missing.onnx", tmp_path / "q.onnx", np.zeros(1), methd="x")
    with pytest.raises(TypeError, match="methd"):
        quantize_model(None, np.zeros(1), methd="x")
    assert list(tmp_path.iterdir()) == []


def test_cli_passes_only_known_options(tmp_path, monkeypatch):
    import bnexport.quantize.pipeline as pipeline

    seen = {}

    def fake_quantize(src, dst, calibration, **options):
        seen.update(options)
        raise SystemExit(0)  # stop here: only the forwarded options matter

    monkeypatch.setattr(pipeline, "quantize", fake_quantize)
    calib = tmp_path / "c.npy"
    np.save(calib, np.zeros((2, 3), np.float32))
    args = ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx")]
    with pytest.raises(SystemExit):
        main([*args, "--calibration", str(calib), "--target", "cpu", "--per-tensor"])
    fields = {f.name for f in dataclasses.fields(QuantizeSettings)}
    assert set(seen) <= fields
    assert fields - set(seen) == {"op_types"}  # every other option has a flag
    settings = QuantizeSettings(**seen)
    assert (settings.target, settings.per_channel) == ("cpu", False)
