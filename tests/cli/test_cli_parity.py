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
        (["--backend", "tvm"], "--backend takes auto, onnxruntime, tensorrt"),
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


def test_json_is_the_report_option(files, capsys):
    """--json writes the report (as export/fold/quantize); --report stays as an alias."""
    report = files["root"] / "j.json"
    argv = ["parity", str(files["keras"]), str(files["onnx"]), "--samples", "2"]
    assert main(argv + ["--json", str(report)]) == 0
    assert json.loads(report.read_text())["passed"]


@pytest.mark.needs_absent("tensorrt", why="the refusal path is not reachable with tensorrt")
def test_tensorrt_missing_is_exit_2_with_the_extra(files, capsys, monkeypatch):
    argv = ["parity", str(files["keras"]), str(files["onnx"]), "--backend", "tensorrt"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "bnexport[tensorrt]"' in err
    assert "parity: FAIL" not in captured.out
    # auto is what run would pick: onnxruntime on a machine without TensorRT
    assert main(["parity", str(files["keras"]), str(files["onnx"]), "--backend", "auto"]) == 0
    assert "Keras vs onnxruntime" in capsys.readouterr().out


def test_missing_backend_in_the_report_keeps_the_extra_name():
    """rich must not eat '[tensorrt]' from the install hint (it reads it as a style tag)."""
    from rich.console import Console

    from bnexport.parity.report import BackendResult, ParityReport

    report = ParityReport(
        model="m.keras",
        onnx="m.onnx",
        samples=2,
        inputs={"image": [2, 8, 8, 3]},
        backends=[BackendResult(backend="tensorrt", precision="fp32")],
    )
    report.backends[0].error = 'needs tensorrt (pip install "bnexport[tensorrt]")'
    console = Console(width=200, record=True)
    report.print(console)
    assert '"bnexport[tensorrt]"' in console.export_text()


def test_signature_mismatch_is_one_line_naming_both(files, tmp_path, capsys):
    other = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,4] y) { y = Relu(x) }"""
    )
    path = tmp_path / "other.onnx"
    onnx.save(other, path)
    assert main(["parity", str(files["keras"]), str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "does not take the inputs of" in err
    assert "Keras (image: float32[?, 8, 8, 3])" in err and "ONNX (x: float32[?, 4])" in err


def test_signature_check_rules():
    """Same count, rank, and sizes on the axes both fix; batch and dynamic axes are free."""
    from bnexport.errors import SignatureMismatchError
    from bnexport.parity.signature import check_signatures
    from bnexport.runtime.io_check import TensorInfo

    class K:
        def __init__(self, name, shape):
            self.name, self.shape, self.dtype = name, shape, "float32"

    class Model:
        inputs = [K("image", (None, 8, 8, 3))]

    f32 = np.dtype("float32")
    ok = [TensorInfo("image", f32, (4, 8, None, 3))]
    check_signatures(Model(), ok, "m.keras", "m.onnx")
    renamed = [TensorInfo("x", f32, (None, 8, 8, 3))]  # paired by position
    check_signatures(Model(), renamed, "m.keras", "m.onnx")
    for bad, why in [
        ([TensorInfo("image", f32, (None, 8, 8, 4))], "axis 3 is 3"),
        ([TensorInfo("image", f32, (None, 64))], "rank 4"),
        (
            [TensorInfo("a", f32, (None, 8, 8, 3)), TensorInfo("b", f32, (None, 1))],
            "1 input(s) vs 2",
        ),
    ]:
        with pytest.raises(
            SignatureMismatchError, match=why.replace("(", r"\(").replace(")", r"\)")
        ):
            check_signatures(Model(), bad, "m.keras", "m.onnx")
