"""Which error decides, the default target, the refusal, 7-bit CPU weights, both branches
of the CPU override (through the API and the CLI)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from qmodels import images, small_cnn
from test_auto_exclude import _fragile_cnn

import bnexport
from bnexport.cli.main import main
from bnexport.errors import QuantizeError
from bnexport.quantize import BelowTargetError
from bnexport.quantize.compare import make_session
from bnexport.runtime.cpu_features import ENV_VAR, hardware_int8_features


def _int8_weights(path) -> list[np.ndarray]:
    model = onnx.load(path)
    init = {t.name: t for t in model.graph.initializer}
    return [
        numpy_helper.to_array(init[n.input[0]])
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in init
        and init[n.input[0]].data_type == onnx.TensorProto.INT8
    ]


def test_cpu_target_uses_7bit_weights_unless_full_range(tmp_path, cnn_path, calib):
    report = bnexport.quantize(cnn_path, tmp_path / "c.onnx", calib, target="cpu")
    weights = _int8_weights(tmp_path / "c.onnx")
    assert weights and max(int(np.abs(w).max()) for w in weights) == 64  # [-64, 64]
    assert report.reduce_range and "7-bit" in str(report)
    meta = {p.key: p.value for p in onnx.load(tmp_path / "c.onnx").metadata_props}
    assert json.loads(meta["bnexport.quantize"])["weights"].startswith("7-bit")
    full = bnexport.quantize(
        cnn_path, tmp_path / "f.onnx", calib, target="cpu", full_range_weights=True
    )
    assert not full.reduce_range
    assert max(int(np.abs(w).max()) for w in _int8_weights(tmp_path / "f.onnx")) == 127
    with pytest.raises(QuantizeError, match="full_range_weights applies to target='cpu'"):
        bnexport.quantize(cnn_path, tmp_path / "x.onnx", calib, full_range_weights=True)


def test_verdict_is_the_quantization_error(tmp_path, cnn_path, calib):
    """The report's agreement is the Q/DQ graph's (optimizations off), recomputed here."""
    val = images(150, seed=4)
    report = bnexport.quantize(cnn_path, tmp_path / "q.onnx", calib, validation=val)
    fp32 = make_session(cnn_path).run(None, {"x": val})[0]
    qdq = make_session(tmp_path / "q.onnx", optimize=False).run(None, {"x": val})[0]
    assert report.top1_agreement == pytest.approx(np.mean(qdq.argmax(1) == fp32.argmax(1)))
    assert report.verdict_target == 0.99 and report.verdict_target_origin == "default"
    assert str(report).splitlines()[1].startswith("verdict: ok")
    assert report.kernel_outputs and report.cpu["machine"]


def test_default_target_skips_tiny_and_non_classifier_graphs(tmp_path, cnn_path, calib):
    report = bnexport.quantize(cnn_path, tmp_path / "q.onnx", calib[:40])
    assert report.verdict_target is None and "40 evaluation rows" in report.verdict_target_origin


def test_below_target_raises_writes_nothing_and_says_what_to_try(tmp_path):
    onnx.save(_fragile_cnn(), tmp_path / "m.onnx")
    with pytest.raises(BelowTargetError) as info:
        bnexport.quantize(
            tmp_path / "m.onnx", tmp_path / "q.onnx", images(64), validation=images(200, seed=9)
        )
    message = str(info.value)
    for hint in ("--target cpu", "--exclude", "--target-agreement", "--keep-below-target"):
        assert hint in message
    assert info.value.report.below_target and not (tmp_path / "q.onnx").exists()
    lines = info.value.report.summary_lines()
    assert lines[0].startswith("verdict: BELOW TARGET")
    assert "TensorRT explicit quantization: not ready (below target)" in lines


def test_novnni_override_predicts_and_names_kernel_saturation(tmp_path, monkeypatch):
    """On any host: the TensorRT form's kernel error is predicted (emulated) where the
    hardware cannot show it, and named; the verdict stays the quantization error."""
    monkeypatch.setenv(ENV_VAR, "novnni")
    onnx.save(small_cnn(), tmp_path / "m.onnx")
    calib, val = images(64), images(200, seed=9)
    with pytest.warns(UserWarning, match="int8 kernels saturate on this graph"):
        report = bnexport.quantize(
            tmp_path / "m.onnx", tmp_path / "q.onnx", calib, validation=val,
            target_agreement=0.9,
        )  # fmt: skip
    assert report.top1_agreement >= 0.9 and report.path  # judged by the Q/DQ graph
    assert report.kernel_top1_agreement < report.top1_agreement - 0.01
    assert report.kernel_emulated is hardware_int8_features().int32_dot
    (warning,) = [w for w in report.warnings if "saturate" in w]
    assert "--target cpu" in warning and "TensorRT" in warning
    # the CPU target is right on such a CPU: kernels agree with the graph's semantics
    cpu = bnexport.quantize(
        tmp_path / "m.onnx", tmp_path / "c.onnx", calib, validation=val, target="cpu",
        target_agreement=0.9,
    )  # fmt: skip
    assert abs(cpu.kernel_top1_agreement - cpu.top1_agreement) <= 0.01
    assert not [w for w in cpu.warnings if "saturate" in w]


def test_vnni_override_measures_real_kernels(tmp_path, monkeypatch, cnn_path, calib):
    monkeypatch.setenv(ENV_VAR, "vnni")
    report = bnexport.quantize(cnn_path, tmp_path / "q.onnx", calib)
    assert not report.kernel_emulated and report.kernel_source.startswith("onnxruntime")


def test_cli_refuses_below_target_unless_kept(tmp_path, capsys):
    onnx.save(_fragile_cnn(), tmp_path / "m.onnx")
    np.save(tmp_path / "c.npy", images(64))
    np.save(tmp_path / "v.npy", images(200, seed=9))
    argv = ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
            "--calibration", str(tmp_path / "c.npy"),
            "--validation", str(tmp_path / "v.npy")]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert "below the target 99.00%" in line and "--keep-below-target" in line
    assert "BELOW TARGET" in captured.out and not (tmp_path / "q.onnx").exists()
    assert main([*argv, "--keep-below-target", "--json", str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["below_target"] and (tmp_path / "q.onnx").is_file()
    assert main([*argv, "--target-agreement", "none"]) == 0  # no target: today's behaviour


def test_cli_help_states_the_rule(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("7-bit weights", "VNNI", "BNEXPORT_CPU_INT8", "--full-range-weights",
                   "--keep-below-target"):  # fmt: skip
        assert phrase in text
