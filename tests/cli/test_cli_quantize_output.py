"""``bnexport quantize`` output: option spelling in its notes, numbers never wrapped."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper as nh
import onnx.parser
from rich.console import Console

from bnexport.cli.main import main


def _model(path):
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,16] x) => (float[N,10] a_rather_long_output_name_for_the_class_scores) {
          a_rather_long_output_name_for_the_class_scores = MatMul(x, W)
        }"""
    )
    w = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32)
    model.graph.initializer.append(nh.from_array(w, "W"))
    onnx.save(model, path)


def test_quantize_notes_use_option_spelling_and_fit_80_columns(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Console, "width", property(lambda self: 80))
    _model(tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(32, 16)).astype(np.float32))
    argv = ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx")]
    assert main(argv + ["--calibration", str(tmp_path / "x.npy")]) == 0
    out = capsys.readouterr().out
    assert "--validation DATA" in out and "validation=" not in out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    row = next(line for line in lines if line.startswith("│ a_rather"))
    assert "%" in row  # the agreement cell is on the name's first line, whole
