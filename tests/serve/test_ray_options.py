"""``serve --replicas``: settings, options and argument checks that need no Ray.

The Ray Serve deployment itself is tested in ``test_ray_serve.py`` (skipped where
``ray[serve]`` is not installed).
"""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest
from serve_models import digits_cnn

from bnexport.cli.main import main
from bnexport.errors import UsageError
from bnexport.serve.ray.options import ReplicaOptions, parse_autoscale
from bnexport.serve.settings import ServeSettings


def test_both_paths_take_one_settings_object():
    """The one-process server and the Ray driver take the same ``ServeSettings``, whole."""
    from bnexport.serve.ray.driver import RayServer, serve_replicas
    from bnexport.serve.server import serve_model

    for function in (serve_model, serve_replicas, RayServer.__init__):
        params = inspect.signature(function).parameters
        assert params["settings"].annotation in ("ServeSettings", "ServeSettings | None")
    # no setting is threaded through as its own keyword any more
    named = set(inspect.signature(serve_model).parameters)
    assert named == {"path", "settings", "print_fn", "keywords"}
    assert not named & {f.name for f in dataclasses.fields(ServeSettings)}


def test_replicas_refuse_bad_server_settings_before_starting_ray():
    """``serve_replicas`` checks the settings as ``serve_model`` does (no Ray is imported)."""
    from bnexport.serve.ray.driver import serve_replicas

    with pytest.raises(UsageError, match=r"--max-batch=0 \(>= 1\)"):
        serve_replicas("m.onnx", ServeSettings(max_batch=0), ReplicaOptions(replicas=2))


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (ReplicaOptions(replicas=0), "--replicas=0 (>= 1)"),
        (ReplicaOptions(gpus_per_replica=-1), "--gpus-per-replica=-1"),
        (ReplicaOptions(replicas=2, autoscale=(3, 1)), "--autoscale=3:1"),
        (ReplicaOptions(replicas=5, autoscale=(1, 4)), "--replicas=5 (within --autoscale 1:4)"),
        (ReplicaOptions(replicas=1, autoscale=(0, 0)), "--autoscale=0:0"),
    ],
)
def test_replica_option_problems(options, problem):
    assert any(problem in p for p in options.problems())


def test_good_replica_options():
    assert ReplicaOptions(replicas=2, autoscale=(1, 4), gpus_per_replica=0.5).problems() == []
    assert ReplicaOptions(replicas=2, autoscale=(1, 4)).most_replicas == 4
    assert ReplicaOptions(replicas=3).most_replicas == 3


def test_parse_autoscale():
    assert parse_autoscale("1:4") == (1, 4)
    for bad in ("4", "a:b", "1:", ":2"):
        with pytest.raises(UsageError, match="MIN:MAX"):
            parse_autoscale(bad)


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    import onnx

    path = tmp_path_factory.mktemp("ray_cli") / "digits.onnx"
    onnx.save(digits_cnn(0), path)
    return path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--autoscale", "1:2"], "need --replicas N"),
        (["--ray-address", "auto"], "need --replicas N"),
        (["--replicas", "0"], "--replicas=0 (>= 1)"),
        (["--replicas", "2", "--autoscale", "x"], "--autoscale='x': expected MIN:MAX"),
        (["--replicas", "2", "--model-control", "explicit"], "--model-control=explicit"),
    ],
)
def test_cli_refuses_bad_replica_flags(digits_onnx, capsys, flags, message):
    """Checked before Ray is imported or started: exit 2, one line."""
    code = main(["serve", str(digits_onnx), "--port", "0", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1


def test_importing_the_ray_package_does_not_import_ray():
    """``bnexport.serve.ray`` (options, driver, gRPC ingress) imports Ray only when it deploys."""
    code = (
        "import sys, bnexport.serve, bnexport.serve.ray, bnexport.serve.ray.options, "
        "bnexport.serve.ray.driver, bnexport.serve.ray.grpc_ingress, bnexport.serve.settings, "
        "bnexport.serve.ray.metrics_board\n"
        "from bnexport.serve.ray import ReplicaOptions, RayServer\n"
        "bad = [m for m in ('ray', 'tensorflow', 'keras') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_grpc_ingress_parses_what_tritonclient_sends():
    """The proxy forwards bytes; the replica parses them with tritonclient's classes."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2

    from bnexport.serve.ray.grpc_ingress import UNARY_RPCS, empty_response, parse_request

    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    infer_input = grpcclient.InferInput("x", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)
    request = service_pb2.ModelInferRequest(model_name="m", inputs=[infer_input._get_tensor()])
    request.raw_input_contents.append(infer_input._get_content())
    parsed = parse_request("ModelInfer", request.SerializeToString())
    assert parsed == request
    assert np.frombuffer(parsed.raw_input_contents[0], np.float32).tolist() == x.ravel().tolist()
    for rpc in UNARY_RPCS:  # every RPC served has its request and response classes
        assert parse_request(rpc, b"") == getattr(service_pb2, f"{rpc}Request")()
        assert empty_response(rpc).SerializeToString() == b""
    assert "ModelStreamInfer" not in UNARY_RPCS


def test_metrics_of_replicas_merge_into_one_exposition():
    """Each family once, every replica's samples labelled; the sums are the replicas' sums."""
    from prometheus_client.parser import text_string_to_metric_families

    from bnexport.serve.core.metrics import ServerMetrics
    from bnexport.serve.ray.metrics_board import MetricsBoard, merge

    a, b = ServerMetrics(), ServerMetrics()
    a.requests.labels("digits", "1", "200").inc(3)
    b.requests.labels("digits", "1", "200").inc(2)
    b.requests.labels("digits", "1", "400").inc()
    a.latency.labels("digits", "1").observe(0.004)
    b.latency.labels("digits", "1").observe(0.03)
    board = MetricsBoard()
    board.put("r1", a.render().decode())
    board.put("r2", b.render().decode())
    text = merge(board.texts()).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert text.count("# TYPE bnexport_requests_total counter") == 1
    ok = {
        s.labels["replica"]: s.value
        for s in families["bnexport_requests"].samples
        if s.name == "bnexport_requests_total" and s.labels["status"] == "200"
    }
    assert ok == {"r1": 3.0, "r2": 2.0}
    counts = {
        s.labels["replica"]: s.value
        for s in families["bnexport_request_latency_seconds"].samples
        if s.name.endswith("_count")
    }
    assert counts == {"r1": 1.0, "r2": 1.0}
    assert "_created" not in text
    board.remove("r1")
    assert set(board.texts()) == {"r2"}
