"""Bad calibration data is refused naming the input, and nothing is written."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from qmodels import images, small_cnn

import bnexport
from bnexport.errors import ArrayFileError, CalibrationError
from bnexport.quantize.calibration import load_calibration_files, make_calibration_set
from bnexport.runtime.io_check import TensorInfo

GOOD = images(8)


@pytest.mark.parametrize(
    "calibration, fragment",
    [
        ({"image": GOOD}, r"unknown input\(s\) \['image'\]"),
        (images(8)[:, :2], "input 'x': dimension 1 must be 3"),
        (GOOD[0], "input 'x': expected rank 4"),
        (GOOD.astype(np.complex64), "input 'x'"),
        (np.array([["a"]]), "input 'x'"),
        ([], "empty"),
        (np.zeros((0, 3, 8, 8), np.float32), "input 'x'.*zero samples"),
        ([GOOD, GOOD[:, :, :4]], r"calibration batch 1.*input 'x'"),
        (np.full((2, 3, 8, 8), np.nan, np.float32), "input 'x'.*NaN"),
        (None, "no calibration data"),
        ("data.npy", "not a path"),
    ],
)
def test_bad_calibration_refused_nothing_written(tmp_path, cnn_path, calibration, fragment):
    with pytest.raises(CalibrationError, match=fragment):
        bnexport.quantize(cnn_path, tmp_path / "q.onnx", calibration)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]


def test_accepted_forms_and_batching():
    infos = [TensorInfo("x", np.dtype("float32"), (None, 3, 8, 8))]
    x64 = images(40).astype(np.float64)  # float64 is cast like Session.run does
    one = make_calibration_set(x64, infos, batch_size=16)
    assert [b["x"].shape[0] for b in one.batches] == [16, 16, 8]
    assert one.batches[0]["x"].dtype == np.float32 and one.num_samples == 40
    many = make_calibration_set(({"x": images(4, s)} for s in range(3)), infos)
    assert len(many.batches) == 3 and many.num_samples == 12
    np.testing.assert_array_equal(many.concatenated()["x"][4:8], images(4, 1))
    reader = many.reader()
    assert [reader.get_next() is not None for _ in range(4)] == [True, True, True, False]


def test_static_batch_dimension_splits_exactly_or_refuses():
    infos = [TensorInfo("x", np.dtype("float32"), (4, 3, 8, 8))]
    assert len(make_calibration_set(images(8), infos).batches) == 2
    with pytest.raises(CalibrationError, match="static batch size 4"):
        make_calibration_set(images(6), infos)


def test_two_input_model_needs_every_name():
    infos = [
        TensorInfo("a", np.dtype("float32"), (None, 2)),
        TensorInfo("b", np.dtype("float32"), (None, 2)),
    ]
    with pytest.raises(CalibrationError, match=r"missing input.*: b: float32"):
        make_calibration_set({"a": np.zeros((2, 2))}, infos)
    with pytest.raises(CalibrationError, match="pass a dict"):
        make_calibration_set(np.zeros((2, 2)), infos)
    with pytest.raises(CalibrationError, match="input 'b': 3 samples"):
        make_calibration_set({"a": np.zeros((2, 2)), "b": np.zeros((3, 2))}, infos)


def test_files_npy_npz_and_pickled(tmp_path):
    np.save(tmp_path / "a.npy", GOOD)
    np.savez(tmp_path / "b.npz", x=GOOD)
    np.savez(tmp_path / "c.npz", GOOD)  # unnamed single array
    loaded = load_calibration_files([tmp_path / "a.npy", tmp_path / "b.npz", tmp_path / "c.npz"])
    assert isinstance(loaded[0], np.ndarray) and set(loaded[1]) == {"x"}
    assert isinstance(loaded[2], np.ndarray)
    np.save(tmp_path / "evil.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ArrayFileError, match="evil.npy.*pickled"):
        load_calibration_files([tmp_path / "evil.npy"])
    (tmp_path / "d.txt").write_text("1 2 3")
    with pytest.raises(ArrayFileError, match="d.txt"):
        load_calibration_files([tmp_path / "d.txt"])


def test_npz_with_wrong_input_name_is_refused_naming_it(tmp_path):
    onnx.save(small_cnn(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", image=GOOD)
    data = load_calibration_files([tmp_path / "c.npz"])
    with pytest.raises(CalibrationError, match="'image'.*x: float32"):
        bnexport.quantize(tmp_path / "m.onnx", tmp_path / "q.onnx", data)
    assert not (tmp_path / "q.onnx").exists()
