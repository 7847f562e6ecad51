"""Per-node sensitivity and the auto-exclude search on a graph with one fragile layer."""

from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper
from qmodels import images, small_cnn

import bnexport
from bnexport.errors import QuantizeError
from bnexport.quantize import BelowTargetError


def _fragile_cnn() -> onnx.ModelProto:
    """conv1's BN shift puts channel 0 at ~200 while the rest stay ~1, and the classifier
    barely reads channel 0: one per-tensor activation scale for the pooled features
    crushes the channels that decide the class."""
    model = small_cnn()
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor).copy()
        if tensor.name == "be1":
            array[0] = 200.0
        elif tensor.name == "wf":
            array[:, 0] *= 0.01
        else:
            continue
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return model


def test_search_excludes_most_sensitive_until_target(tmp_path):
    onnx.save(_fragile_cnn(), tmp_path / "m.onnx")
    calib, val = images(64), images(200, seed=9)
    with pytest.raises(BelowTargetError, match="below the target 99.00%"):
        bnexport.quantize(tmp_path / "m.onnx", tmp_path / "p.onnx", calib, validation=val)
    assert not (tmp_path / "p.onnx").exists()  # refused: nothing written
    plain = bnexport.quantize(
        tmp_path / "m.onnx", tmp_path / "p.onnx", calib, validation=val, keep_below_target=True
    )
    assert plain.top1_agreement < 0.9  # the fragile layer really hurts
    assert plain.below_target and plain.verdict_line().startswith("verdict: BELOW TARGET")
    assert (tmp_path / "p.onnx").is_file()
    report = bnexport.quantize(
        tmp_path / "m.onnx", tmp_path / "q.onnx", calib, validation=val, target_agreement=0.97
    )
    ranking = list(report.sensitivity)
    assert ranking[0] == "fc"  # its input (the pooled features) is the crushed tensor
    assert report.sensitivity["fc"] > 10 * report.sensitivity["conv0"]
    k = len(report.auto_excluded)
    assert report.auto_excluded == ranking[:k] and k >= 1
    assert report.top1_agreement >= 0.97 and report.search[-1].top1_agreement >= 0.97
    assert all(step.top1_agreement < 0.97 for step in report.search[:-1])
    assert set(report.float_nodes) == set(report.auto_excluded)


def test_search_that_cannot_reach_target_fails_and_writes_nothing(tmp_path):
    onnx.save(_fragile_cnn(), tmp_path / "m.onnx")
    with pytest.raises(QuantizeError, match="not reached with up to 0 node"):
        bnexport.quantize(
            tmp_path / "m.onnx", tmp_path / "q.onnx", images(64),
            validation=images(200, seed=9), target_agreement=0.999, max_exclude=0,
        )  # fmt: skip
    assert not (tmp_path / "q.onnx").exists()
