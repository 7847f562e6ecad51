"""``bnexport parity``: exit codes 0/1/2, reports written, corrupted layer named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))
from parity_models import conv_bn_model, perturb_weight, producer_of  # noqa: E402

import bnexport  # noqa: E402
from bnexport.cli.main import main  # noqa: E402
from bnexport.parity.per_layer import metadata_layer_map  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_parity")
    model = conv_bn_model("cli")
    keras_path, onnx_path = root / "m.keras", root / "m.onnx"
    model.save(keras_path)
    bnexport.export(model, onnx_path)
    bad = onnx.load(onnx_path)
    perturb_weight(bad, producer_of(bad, metadata_layer_map(bad)["bn3"]), delta=0.5)
    bad_path = root / "bad.onnx"
    onnx.save(bad, bad_path)
    data = root / "data.npz"
    np.savez(data, image=np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype("float32"))
    return {"keras": keras_path, "onnx": onnx_path, "bad": bad_path, "data": data, "root": root}


def test_pass_exit_0_with_reports(files, capsys):
    report, html = files["root"] / "r.json", files["root"] / "r.html"
    argv = ["parity", str(files["keras"]), str(files["onnx"]), "--inputs", str(files["data"])]
    argv += ["--per-layer", "--training-mode", "--report", str(report), "--html", str(html)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "parity: PASS" in out and "logits" in out
    data = json.loads(report.read_text())
    assert data["passed"] and data["samples"] == 4 and data["training_mode"]
    assert "data:image/png;base64," in html.read_text()


def test_corrupted_exit_1_names_layer(files, capsys):
    report = files["root"] / "bad.json"
    argv = ["parity", str(files["keras"]), str(files["bad"]), "--samples", "4", "--per-layer"]
    assert main(argv + ["--report", str(report)]) == 1
    out = capsys.readouterr().out
    assert "parity: FAIL" in out and "first divergence at layer 'bn3'" in out
    assert json.loads(report.read_text())["backends"][0]["first_failing_layer"] == "bn3"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "tvm"], "--backend takes onnxruntime"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["--rtol", "-1"], "--rtol must be >= 0"),
        (["--inputs", "missing.npz"], "inputs file not found"),
        (["--html", "/nonexistent-dir/r.html"], "folder does not exist"),
    ],
)
def test_usage_errors_exit_2(files, capsys, extra, message):
    assert main(["parity", str(files["keras"]), str(files["onnx"]), *extra]) == 2
    assert message in capsys.readouterr().err


def test_missing_files_exit_2(files, capsys):
    assert main(["parity", str(files["root"] / "no.keras"), str(files["onnx"])]) == 2
    assert "Keras model not found" in capsys.readouterr().err
    assert main(["parity", str(files["keras"]), str(files["root"] / "no.onnx")]) == 2


def test_inputs_and_samples_are_exclusive(files):
    with pytest.raises(SystemExit) as exc:
        main(["parity", "a.keras", "b.onnx", "--inputs", "d.npz", "--samples", "3"])
    assert exc.value.code == 2
