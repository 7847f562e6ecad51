"""``bnexport triton-repo``: layout, and config.pbtxt parsed by Triton's model_config.proto."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from serve_models import digits_cnn, fixed_batch_model, images

from bnexport.cli.main import main
from bnexport.errors import UsageError
from bnexport.serve.repository import ModelRepository
from bnexport.serve.triton_repo import model_config_pb2, write_triton_repo

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture()
def digits_onnx(tmp_path):
    path = tmp_path / "digits.onnx"
    onnx.save(digits_cnn(0), path)
    return path


def _parse(path):
    pb2 = model_config_pb2()
    return pb2, text_format.Parse(path.read_text(), pb2.ModelConfig())


def test_onnxruntime_repo_layout_and_config(digits_onnx, tmp_path):
    out = tmp_path / "triton"
    res = write_triton_repo(digits_onnx, out, max_batch=16, instances=2, instance_kind="gpu")
    assert res.plan_written and res.model_file == out / "digits" / "1" / "model.onnx"
    assert res.model_file.read_bytes() == digits_onnx.read_bytes()
    pb2, cfg = _parse(out / "digits" / "config.pbtxt")
    assert cfg.name == "digits" and cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == 16
    assert [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input] == [
        ("image", "TYPE_FP32", [8, 8, 1])
    ]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [("logits", [10]), ("probs", [10])]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    (group,) = cfg.instance_group
    assert group.count == 2 and group.kind == pb2.ModelInstanceGroup.Kind.Value("KIND_GPU")


def test_served_back_by_bnexport(digits_onnx, tmp_path):
    """The written repository is also a valid ``bnexport serve`` repository."""
    out = tmp_path / "triton"
    write_triton_repo(digits_onnx, out, max_batch=8, batch_timeout_ms=3)
    repo = ModelRepository.from_path(out, max_batch=32)
    model = repo.get("digits")
    assert (model.max_batch, model.batch_timeout_s) == (8, 0.003)
    x = images(2, 0)
    want = ort.InferenceSession(str(digits_onnx)).run(["probs"], {"image": x})[0]
    np.testing.assert_array_equal(model.session.run({"image": x})["probs"], want)


def test_dynamic_dims_and_no_batching(tmp_path):
    fixed = tmp_path / "fixed.onnx"
    onnx.save(fixed_batch_model(), fixed)
    with pytest.raises(UsageError, match="tensor 'x' has a fixed first dimension"):
        write_triton_repo(fixed, tmp_path / "t1", max_batch=4)
    res = write_triton_repo(fixed, tmp_path / "t2", max_batch=0)
    pb2, cfg = _parse(res.config_path)
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [1, 4]

    model = digits_cnn(0)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "H"  # dynamic height
    dyn = tmp_path / "dyn.onnx"
    onnx.save(model, dyn)
    _, cfg = _parse(write_triton_repo(dyn, tmp_path / "t3").config_path)
    assert list(cfg.input[0].dims) == [-1, 8, 1]


def test_bad_arguments(digits_onnx, tmp_path):
    with pytest.raises(UsageError, match="backend='tf'"):
        write_triton_repo(digits_onnx, tmp_path, backend="tf")
    with pytest.raises(UsageError, match="instance_kind='cpu'"):
        write_triton_repo(digits_onnx, tmp_path, backend="tensorrt", instance_kind="cpu")
    with pytest.raises(UsageError, match="instances=0"):
        write_triton_repo(digits_onnx, tmp_path, instances=0)


@pytest.mark.skipif(HAS_TRT, reason="checks the no-TensorRT path")
def test_tensorrt_without_tensorrt_writes_config_and_instructions(digits_onnx, tmp_path):
    res = write_triton_repo(digits_onnx, tmp_path / "t", backend="tensorrt", max_batch=32)
    assert not res.plan_written and not res.model_file.exists()
    assert res.notes and "NOT written" in res.notes[0]
    _, cfg = _parse(res.config_path)
    assert cfg.backend == "tensorrt" and cfg.max_batch_size == 32
    readme = (res.model_dir / "README.md").read_text()
    assert "aot_impl" in readme and "--backend-config=tensorrt,plugins=" in readme
    assert (res.model_dir / "model.onnx").read_bytes() == digits_onnx.read_bytes()


@pytest.mark.skipif(not HAS_TRT, reason="needs tensorrt: building model.plan is not verified")
def test_tensorrt_plan_written(digits_onnx, tmp_path):  # pragma: no cover - no TensorRT here
    res = write_triton_repo(digits_onnx, tmp_path / "t", backend="tensorrt", max_batch=8)
    assert res.plan_written and res.model_file.stat().st_size > 0


def test_cli_triton_repo_and_kserve(digits_onnx, tmp_path, capsys):
    out = tmp_path / "repo"
    code = main(
        ["triton-repo", str(digits_onnx), str(out), "--max-batch", "4", "--instances", "3"]
        + ["--kserve", "s3://bucket/models"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "validated" in printed and "kserve-inferenceservice.yaml" in printed
    _, cfg = _parse(out / "digits" / "config.pbtxt")
    assert cfg.max_batch_size == 4 and cfg.instance_group[0].count == 3
    yaml_text = (out / "kserve-inferenceservice.yaml").read_text()
    assert "kind: InferenceService" in yaml_text and "storageUri: s3://bucket/models" in yaml_text
    assert main(["triton-repo", str(tmp_path / "missing.onnx"), str(out)]) == 1
