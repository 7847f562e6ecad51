"""Model repository: files confined to their folder, one input validator, index, load/unload.

Load/unload run against a copy of a repository on disk with ``tritonclient``
(HTTP and gRPC). Answers are compared with the float64 NumPy reference of the
model the file holds (rtol=1e-4, atol=1e-5), so a request served by the wrong
version fails.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_helpers import running_servers
from serve_models import digits_cnn, digits_reference, images
from support import wait_until
from tritonclient.utils import InferenceServerException

from bnexport.errors import InputError, UsageError
from bnexport.runtime.io_check import TensorInfo, check_inputs
from bnexport.serve.core.repository import ModelRepository, default_session_factory
from bnexport.serve.protocol.errors import BadRequestError
from bnexport.serve.rest.app import create_app

RTOL, ATOL = 1e-4, 1e-5


def _repo(root, seed=0, config: str | None = None, filename="model.onnx"):
    (root / "digits" / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(digits_cnn(seed), root / "digits" / "1" / filename)
    if config is not None:
        (root / "digits" / "config.pbtxt").write_text(config)
    return root


# -- model files stay inside their model folder -----------------------------------------------
@pytest.mark.parametrize(
    "filename", ["../../outside.onnx", "../1/model.onnx", "sub/model.onnx", "..", "/etc/passwd"]
)
def test_default_model_filename_must_be_a_plain_name(tmp_path, filename):
    root = _repo(tmp_path / "repo", config=f'default_model_filename: "{filename}"\n')
    onnx.save(digits_cnn(1), tmp_path / "outside.onnx")
    with pytest.raises(UsageError, match="default_model_filename"):
        ModelRepository.from_path(root)


def test_model_file_linking_outside_is_refused(tmp_path):
    root = tmp_path / "repo"
    (root / "digits" / "1").mkdir(parents=True)
    onnx.save(digits_cnn(1), tmp_path / "outside.onnx")
    os.symlink(tmp_path / "outside.onnx", root / "digits" / "1" / "model.onnx")
    with pytest.raises(UsageError, match="outside its model folder"):
        ModelRepository.from_path(root)


def test_default_model_filename_inside_is_served(tmp_path):
    root = _repo(
        tmp_path / "repo", config='default_model_filename: "net.onnx"\n', filename="net.onnx"
    )
    repo = ModelRepository.from_path(root)
    assert repo.get("digits").path.name == "net.onnx"


# -- one input validator ----------------------------------------------------------------------
def test_server_and_session_share_the_validator(tmp_path):
    """The server refuses what Session.run would cast (float64); both name the input."""
    repo = ModelRepository.from_path(_repo(tmp_path / "repo"))
    model = repo.get("digits")
    x64 = np.zeros((2, 8, 8, 1))
    with pytest.raises(BadRequestError, match=r"model 'digits': input 'image': .*expects float32"):
        model.check_inputs({"image": x64})
    assert model.session.run({"image": x64})["probs"].shape == (2, 10)  # Session casts
    with pytest.raises(BadRequestError, match=r"model 'digits': input 'image': dimension 1"):
        model.check_inputs({"image": np.zeros((2, 7, 8, 1), np.float32)})
    assert model.check_inputs({"image": np.zeros((2, 8, 8, 1), np.float32)}) == 2
    info = [TensorInfo("s", np.dtype(object), (None,))]
    strings = np.array([b"a", b"bc"], dtype=object)
    assert check_inputs({"s": strings}, info, cast=False)["s"] is strings
    with pytest.raises(InputError, match="no conversion"):
        check_inputs({"s": np.zeros(2, np.float32)}, info, cast=False)


# -- index, load, unload ----------------------------------------------------------------------
class _HeldFirst:
    """Session factory: runs of the first session built wait for :attr:`release`.

    So requests on the old version stay in flight, deterministically, while a load
    swaps the new version in.
    """

    def __init__(self) -> None:
        self.built = 0
        self.running = threading.Event()
        self.release = threading.Event()

    def __call__(self, path: str, **kwargs):
        session = default_session_factory(path, **kwargs)
        self.built += 1
        if self.built > 1:
            return session
        run, started, release = session.run, self.running, self.release

        class Held:
            inputs, outputs = session.inputs, session.outputs

            def run(self, feed, **kw):
                started.set()
                assert release.wait(60), "the test never released the old version"
                return run(feed, **kw)

        return Held()


def _serve(root, mode="explicit", factory=default_session_factory):
    repo = ModelRepository.from_path(
        root, max_batch=8, batch_timeout_ms=1.0, session_factory=factory
    )
    repo.control_mode = mode
    return running_servers(create_app(repo))


def _infer_http(url: str, x: np.ndarray) -> np.ndarray:
    client = httpclient.InferenceServerClient(url)
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    return client.infer("digits", [inp]).as_numpy("probs")


def _infer_grpc(client, x):
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("digits", [inp]).as_numpy("probs")


def test_model_control_none_refuses_load_and_unload(tmp_path):
    with _serve(_repo(tmp_path / "repo"), mode="none") as s:
        http = httpclient.InferenceServerClient(s.http)
        with pytest.raises(InferenceServerException, match="--model-control explicit"):
            http.load_model("digits")
        client = grpcclient.InferenceServerClient(s.grpc)
        with pytest.raises(InferenceServerException) as excinfo:
            client.unload_model("digits")
        assert str(excinfo.value.status()) == "StatusCode.FAILED_PRECONDITION"
        assert http.get_model_repository_index() == [
            {"name": "digits", "version": "1", "state": "READY", "reason": ""}
        ]


def test_load_replaces_and_unload_removes(tmp_path):
    root = _repo(tmp_path / "repo", seed=0)
    x = images(2, seed=9)
    with _serve(root) as s:
        http = httpclient.InferenceServerClient(s.http)
        client = grpcclient.InferenceServerClient(s.grpc)
        np.testing.assert_allclose(
            _infer_grpc(client, x), digits_reference(x, 0)["probs"], RTOL, ATOL
        )
        onnx.save(digits_cnn(5), root / "digits" / "1" / "model.onnx")  # a new model file
        http.load_model("digits")
        for got in (_infer_grpc(client, x), _infer_http(s.http, x)):
            np.testing.assert_allclose(got, digits_reference(x, 5)["probs"], RTOL, ATOL)
        stats = http.get_inference_statistics("digits")["model_stats"][0]
        assert stats["inference_count"] == 4  # statistics of the new version only

        client.unload_model("digits")
        assert not client.is_model_ready("digits")
        with pytest.raises(InferenceServerException) as excinfo:
            _infer_grpc(client, x)
        assert str(excinfo.value.status()) == "StatusCode.NOT_FOUND"
        index = client.get_model_repository_index(as_json=True)["models"]
        assert index == [{"name": "digits", "state": "UNAVAILABLE", "reason": "unloaded"}]
        assert http.get_model_repository_index() == [
            {"name": "digits", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}
        ]
        with pytest.raises(InferenceServerException, match="not loaded"):
            http.unload_model("digits")

        (root / "extra" / "1").mkdir(parents=True)
        onnx.save(digits_cnn(2), root / "extra" / "1" / "model.onnx")
        client.load_model("digits")
        client.load_model("extra")  # a model added to the folder while serving
        np.testing.assert_allclose(
            _infer_grpc(client, x), digits_reference(x, 5)["probs"], RTOL, ATOL
        )
        ready = http.get_model_repository_index()
        assert [(m["name"], m["state"]) for m in ready] == [("digits", "READY"), ("extra", "READY")]
        with pytest.raises(InferenceServerException, match="no model 'nope'"):
            http.load_model("nope")


def test_failed_load_keeps_the_old_version(tmp_path):
    root = _repo(tmp_path / "repo", seed=0)
    x = images(1, seed=2)
    with _serve(root) as s:
        client = grpcclient.InferenceServerClient(s.grpc)
        (root / "digits" / "1" / "model.onnx").write_bytes(b"not an onnx file")
        with pytest.raises(InferenceServerException) as excinfo:
            client.load_model("digits")
        assert "digits" in excinfo.value.message()
        np.testing.assert_allclose(
            _infer_grpc(client, x), digits_reference(x, 0)["probs"], RTOL, ATOL
        )


def test_in_flight_requests_finish_on_the_old_version(tmp_path):
    """Requests running on v(seed 0) when a load swaps in seed 3 are answered by seed 0."""
    root = _repo(tmp_path / "repo", seed=0)
    factory = _HeldFirst()
    xs = [images(1, seed=40 + i) for i in range(4)]
    with _serve(root, factory=factory) as s:
        client = grpcclient.InferenceServerClient(s.grpc)
        repo = s.server.config.app.state.repository
        first = repo.get("digits")
        with concurrent.futures.ThreadPoolExecutor(len(xs) + 1) as pool:
            try:
                old = [pool.submit(_infer_grpc, client, x) for x in xs]
                assert factory.running.wait(30)  # a batch is inside the old model
                onnx.save(digits_cnn(3), root / "digits" / "1" / "model.onnx")
                load = pool.submit(client.load_model, "digits")
                # until the new version is swapped in
                wait_until(lambda: repo.get("digits") is not first, 60, interval=0.005)
                new = _infer_http(s.http, xs[0])  # served at once by the new version
                assert not any(f.done() for f in old) and not load.done()
            finally:
                factory.release.set()
            load.result(timeout=60)  # returned once the old requests were answered
            answers = [f.result(timeout=60) for f in old]
        for x, got in zip(xs, answers, strict=True):
            np.testing.assert_allclose(got, digits_reference(x, 0)["probs"], RTOL, ATOL)
        np.testing.assert_allclose(new, digits_reference(xs[0], 3)["probs"], RTOL, ATOL)
