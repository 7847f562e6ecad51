"""``bnexport triton-repo``: layout, and config.pbtxt parsed by Triton's model_config.proto."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from serve_models import digits_cnn, fixed_batch_model, images

from bnexport.cli.main import main
from bnexport.errors import UsageError
from bnexport.serve.core.repository import ModelRepository
from bnexport.serve.triton.repo import model_config_pb2, write_triton_repo


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


@pytest.mark.needs_absent("tensorrt", why="checks the no-TensorRT path")
def test_tensorrt_without_tensorrt_is_refused_before_writing(digits_onnx, tmp_path, capsys):
    """No plan can be built: refuse (exit 2, the [tensorrt] hint), write nothing."""
    from bnexport.errors import MissingExtraError

    with pytest.raises(MissingExtraError, match=r'pip install "bnexport\[tensorrt\]"'):
        write_triton_repo(digits_onnx, tmp_path / "t", backend="tensorrt", max_batch=32)
    assert not (tmp_path / "t").exists()
    code = main(["triton-repo", str(digits_onnx), str(tmp_path / "c"), "--backend", "tensorrt"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "bnexport[tensorrt]" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.needs("tensorrt", unverified="building model.plan")
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
    assert "kind: InferenceService" in yaml_text and 'storageUri: "s3://bucket/models"' in yaml_text
    assert main(["triton-repo", str(tmp_path / "missing.onnx"), str(out)]) == 2  # unusable input


def _fused_norm_onnx(tmp_path):
    from bnexport_plugins.fused_norm import onnx_node

    onnx_node.register_onnx_schema()
    c = 4
    node = onnx_node.make_node(["x", "scale", "shift"], ["y"], name="fn", activation="relu")
    rng = np.random.default_rng(3)
    scale = rng.standard_normal(c).astype(np.float32)
    shift = rng.standard_normal(c).astype(np.float32)
    graph = onnx.helper.make_graph(
        [node],
        "fused",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", c, 3, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", c, 3, 3])],
        [
            onnx.numpy_helper.from_array(scale, "scale"),
            onnx.numpy_helper.from_array(shift, "shift"),
        ],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 18), onnx_node.opset_import()]
    )
    path = tmp_path / "fused.onnx"
    onnx.save(model, path)
    return path, scale, shift


def test_fused_norm_graph_is_lowered_for_onnxruntime(tmp_path):
    """Regression: the default backend used to fail with "no lowering ... available"."""
    path, scale, shift = _fused_norm_onnx(tmp_path)
    res = write_triton_repo(path, tmp_path / "repo", max_batch=8)
    assert res.plan_written and "lowered" in res.notes[0]
    lowered = onnx.load(res.model_file)
    assert not any(n.domain == "bnexport" for n in lowered.graph.node)
    assert all(o.domain in ("", "ai.onnx") for o in lowered.opset_import)
    x = np.random.default_rng(4).standard_normal((2, 4, 3, 3)).astype(np.float32)
    got = ort.InferenceSession(res.model_file.read_bytes()).run(["y"], {"x": x})[0]
    want = np.maximum(x * scale[:, None, None] + shift[:, None, None], 0)  # relu(x*s + b)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["../../x", "..", ".", "a/b", "", "x y"])
def test_model_name_cannot_leave_out_dir(digits_onnx, tmp_path, name):
    out = tmp_path / "deep" / "repo"
    out.mkdir(parents=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UsageError, match="model name"):
        write_triton_repo(digits_onnx, out, model_name=name)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert main(["triton-repo", str(digits_onnx), str(out), "--name", name]) != 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_config_names_are_escaped_by_text_format(tmp_path):
    """Tensor names with quotes, backslashes and newlines survive config.pbtxt unchanged."""
    names = ['in"put\n1', "out\\put 'y'"]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", [names[0]], [names[1]])],
        "odd",
        [onnx.helper.make_tensor_value_info(names[0], onnx.TensorProto.FLOAT, ["N", 3])],
        [onnx.helper.make_tensor_value_info(names[1], onnx.TensorProto.FLOAT, ["N"])],
    )
    path = tmp_path / "odd\nname.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), path)
    res = write_triton_repo(path, tmp_path / "repo", max_batch=4, batch_timeout_ms=0)
    assert res.model_dir.name == "odd_name"
    text = res.config_path.read_text()
    assert text.startswith("# ") and text.count("#") == 1  # the source comment stays one line
    pb2, cfg = _parse(res.config_path)
    assert [t.name for t in cfg.input] == [names[0]]
    assert [t.name for t in cfg.output] == [names[1]]
    assert list(cfg.output[0].dims) == [1] and cfg.output[0].HasField("reshape")  # scalar per item
    assert list(cfg.output[0].reshape.shape) == []
    assert cfg.HasField("dynamic_batching")  # kept with a zero queue delay
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 0


def test_model_config_without_grpcio(digits_onnx, tmp_path):
    """tritonclient.grpc raises RuntimeError without grpcio; the config must not need it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['grpc'] = None  # as if grpcio were not installed\n"
        "from bnexport.serve.triton.repo import write_triton_repo\n"
        f"res = write_triton_repo({str(digits_onnx)!r}, {str(tmp_path / 'out')!r})\n"
        "print(res.config.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "digits"
