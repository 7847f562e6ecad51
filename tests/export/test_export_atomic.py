"""Atomic writes: a failed or interrupted export leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import onnx
import pytest
from export_models import randomize_bn

import bnexport
from bnexport import atomic_write
from bnexport.errors import ExportError, VerificationError
from bnexport.export import verify


@pytest.fixture(scope="module")
def model():
    inp = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="c")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    m = keras.Model(inp, keras.layers.ReLU()(x))
    randomize_bn(m)
    return m


def test_missing_directory_fails_up_front(tmp_path, model):
    target = tmp_path / "no" / "such" / "dir" / "m.onnx"
    with pytest.raises(ExportError, match="does not exist"):
        bnexport.export(model, target)
    assert not (tmp_path / "no").exists()


def test_unwritable_directory_fails_up_front(tmp_path, model):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: use a pseudo-filesystem
            target = "/proc/bnexport_test_export.onnx"
            with pytest.raises(ExportError, match="cannot write"):
                bnexport.export(model, target)
            assert not os.path.exists(target)
        else:
            with pytest.raises(ExportError, match="not writable"):
                bnexport.export(model, locked / "m.onnx")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_path_is_a_directory(tmp_path, model):
    with pytest.raises(ExportError, match="is a directory"):
        bnexport.export(model, tmp_path)


def test_verification_failure_leaves_nothing(tmp_path, model, monkeypatch):
    monkeypatch.setitem(verify.TOLERANCES, "float32", (0.0, -1.0))  # nothing can pass
    path = tmp_path / "m.onnx"
    with pytest.raises(VerificationError, match=r"output 're_lu.*max abs error .* tolerance"):
        bnexport.export(model, path)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_write_leaves_old_file_and_no_temp(tmp_path, model, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old contents")

    real_write_bytes = Path.write_bytes

    def interrupted_write(self, data):  # the exporter's temp file is ".m.onnx.<random>.tmp"
        if not self.name.startswith(".m.onnx."):
            return real_write_bytes(self, data)
        real_write_bytes(self, data[:100])  # a partial file...
        raise KeyboardInterrupt  # ...then Ctrl-C

    def interrupted_save(proto, target, *args, **kwargs):
        interrupted_write(Path(target), proto.SerializeToString())

    # however the exporter writes the bytes (onnx.save_model or Path.write_bytes)
    monkeypatch.setattr(onnx, "save_model", interrupted_save)
    monkeypatch.setattr(Path, "write_bytes", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        bnexport.export(model, path)
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_success_replaces_file_with_usual_permissions(tmp_path, model):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    bnexport.export(model, path, verify=False)
    onnx.checker.check_model(onnx.load(path))
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_write_text_atomic_roundtrip(tmp_path):
    out = atomic_write.write_text_atomic(tmp_path / "r.json", '{"a": 1}')
    assert out.read_text() == '{"a": 1}'
    with pytest.raises(ExportError):
        atomic_write.write_text_atomic(tmp_path / "missing" / "r.json", "x", error=ExportError)
    assert np.array_equal(sorted(p.name for p in tmp_path.iterdir()), ["r.json"])
