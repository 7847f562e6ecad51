"""``bnexport quantize``: end to end with .npy/.npz data, JSON report, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from qmodels import images, small_cnn

from bnexport.cli.main import main


def test_quantize_cli_end_to_end(tmp_path, cnn_path, capsys):
    np.save(tmp_path / "calib.npy", images(32))
    np.savez(tmp_path / "more.npz", x=images(16, seed=3))
    np.save(tmp_path / "val.npy", images(40, seed=4))
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    rc = main(
        [
            "quantize", str(cnn_path), "-o", str(out),
            "--calibration", str(tmp_path / "calib.npy"), str(tmp_path / "more.npz"),
            "--validation", str(tmp_path / "val.npy"),
            "--method", "percentile", "--exclude", "fc", "--json", str(report),
        ]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed and "2 BN folded" in printed
    data = json.loads(report.read_text())
    assert data["calibration_samples"] == 48 and data["eval_samples"] == 40
    assert data["eval_data"] == "validation" and data["excluded"] == ["fc"]
    assert data["method"] == "percentile" and data["bn_folded"] == 2
    assert data["tensorrt_ready"] is True
    x = images(4, seed=9)
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    assert got.shape == (4, 10) and np.isfinite(got).all()
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)


def test_quantize_cli_errors_are_one_line_and_write_nothing(tmp_path, cnn_path, capsys):
    np.savez(tmp_path / "bad.npz", image=images(4))
    rc = main(["quantize", str(cnn_path), "-o", str(tmp_path / "q.onnx"),
               "--calibration", str(tmp_path / "bad.npz")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "'image'" in err and len(err.strip().splitlines()) == 1  # unusable data
    np.save(tmp_path / "evil.npy", np.array([object()], dtype=object), allow_pickle=True)
    rc = main(["quantize", str(cnn_path), "-o", str(tmp_path / "q.onnx"),
               "--calibration", str(tmp_path / "evil.npy")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "evil.npy" in err and "pickled" in err
    rc = main(["quantize", str(cnn_path), "-o", str(cnn_path),
               "--calibration", str(tmp_path / "bad.npz")])  # fmt: skip
    assert rc == 2 and "input" in capsys.readouterr().err
    onnx.save(small_cnn(unfoldable_bn=True), tmp_path / "u.onnx")
    np.save(tmp_path / "c.npy", images(8))
    rc = main(["quantize", str(tmp_path / "u.onnx"), "-o", str(tmp_path / "q.onnx"),
               "--calibration", str(tmp_path / "c.npy")])  # fmt: skip
    assert rc == 1 and "--allow-unfolded-bn" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()
