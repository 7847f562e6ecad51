"""KServe manifests: valid against KServe's CRD schemas (strict), and their command serves.

Every YAML document the project ships (``docs/kserve-inferenceservice.yaml``) or writes
(``triton-repo --kserve``, CPU and GPU variants) is validated against the
``openAPIV3Schema`` of KServe v0.14.1, v0.15.2 and v0.16.0 vendored under
``kserve_crds/`` (see its README), with ``additionalProperties: false`` added wherever
the CRD does not preserve unknown fields, so a misspelt or misplaced field fails as the
API server would prune or refuse it. Then the container command of the manifests (the
runtime's ``command`` + ``args`` + the InferenceService's ``args``, as KServe merges
them; equal to the Containerfile's ENTRYPOINT + CMD) runs against a model, probed as
the kubelet would: readiness, liveness, one inference, a scrape of the metrics path.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import onnx
import pytest
import yaml
from serve_helpers import make_app, metric, running_server
from serve_models import digits_cnn, digits_reference, images, infer_json_body
from support import wait_until
from support.servers import free_port

from bnexport.cli.main import main
from bnexport.errors import UsageError
from bnexport.serve import kserve

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = Path(__file__).resolve().parent / "kserve_crds"
VERSIONS = ("v0.14.1", "v0.15.2", "v0.16.0")
SCHEMA_FILES = {
    "InferenceService": "inferenceservice.json",
    "ClusterServingRuntime": "clusterservingruntime.json",
}
TOKEN = "kserve-test-token"
RTOL, ATOL = 1e-4, 1e-5  # float32 model vs float64 NumPy reference


def _strict(schema: dict) -> dict:
    """``schema`` with ``additionalProperties: false`` on every closed object."""
    out = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(out)
    return out


def _validator(version: str, kind: str):
    spec = json.loads((CRD_DIR / version / SCHEMA_FILES[kind]).read_text())
    return spec["apiVersion"], jsonschema.Draft7Validator(_strict(spec["openAPIV3Schema"]))


def _check_metadata(doc: dict) -> None:
    """What the API server checks of metadata (the CRD schema leaves it open)."""
    meta = doc["metadata"]
    assert set(meta) <= {"name", "annotations", "labels"}, meta
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", meta["name"]) and len(meta["name"]) <= 63
    for key in ("annotations", "labels"):
        values = meta.get(key, {})
        assert all(isinstance(v, str) for v in values.values()), (key, values)


def _errors(doc: dict, version: str) -> list[str]:
    api_version, validator = _validator(version, doc["kind"])
    assert doc["apiVersion"] == api_version
    _check_metadata(doc)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """``triton-repo --kserve`` outputs: CPU onnxruntime, KIND_GPU onnxruntime, TensorRT.

    The TensorRT variant comes from :func:`bnexport.serve.kserve.write_manifests` directly:
    ``triton-repo --backend tensorrt`` refuses to run where TensorRT is not installed.
    """
    base = tmp_path_factory.mktemp("kserve")
    src = base / "digits_v2.onnx"
    onnx.save(digits_cnn(0), src)
    outs = {}
    for label, extra in (("cpu", []), ("gpu", ["--instance-kind", "gpu"])):
        out = base / label
        args = ["triton-repo", str(src), str(out), "--max-batch", "8", "--kserve", "s3://b/m x"]
        assert main(args + extra) == 0
        outs[label] = out
    outs["trt"] = base / "trt"
    outs["trt"].mkdir()
    paths, notes = kserve.write_manifests(
        outs["trt"], "s3://b/m x", model_name="digits_v2", backend="tensorrt", max_batch=8
    )
    assert [p.name for p in paths] == ["kserve-inferenceservice.yaml"]
    assert "kserve-bnexport.yaml not written" in notes[0] and "TensorRT plan" in notes[0]
    return outs


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_manifests(written) -> dict[str, list[dict]]:
    found = {"docs": _docs(ROOT / "docs" / "kserve-inferenceservice.yaml")}
    for label, out in written.items():
        for path in sorted(out.glob("*.yaml")):
            found[f"{label}/{path.name}"] = _docs(path)
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(written, version):
    manifests = _all_manifests(written)
    assert set(manifests) == {
        "docs",
        "cpu/kserve-inferenceservice.yaml",
        "cpu/kserve-bnexport.yaml",
        "gpu/kserve-inferenceservice.yaml",
        "gpu/kserve-bnexport.yaml",
        "trt/kserve-inferenceservice.yaml",
    }
    kinds = [d["kind"] for docs in manifests.values() for d in docs]
    assert kinds.count("ClusterServingRuntime") == 3 and kinds.count("InferenceService") == 8
    for where, docs in manifests.items():
        for doc in docs:
            assert _errors(doc, version) == [], (where, doc["metadata"]["name"])


@pytest.mark.parametrize("version", ("v0.14.1", "v0.16.0"))
def test_schema_check_is_strict(version):
    """The check can fail: a misplaced field, a wrong type, a bare string for args."""
    runtime, isvc, *_ = yaml.safe_load_all(kserve.docs_example_yaml())
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["model"]["storageURI"] = "s3://typo"
    assert any("storageURI" in e for e in _errors(bad, version))
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["minReplicas"] = "1"
    assert any("minReplicas" in e for e in _errors(bad, version))
    bad = copy.deepcopy(runtime)
    bad["spec"]["containers"][0]["args"] = "--port=8080"
    assert any("args" in e for e in _errors(bad, version))
    bad = copy.deepcopy(runtime)
    bad["spec"]["containers"][0]["ports"][0]["port"] = 8080  # Service field in a container
    assert any("port" in e for e in _errors(bad, version))


def test_docs_file_is_the_generated_text():
    text = (ROOT / "docs" / "kserve-inferenceservice.yaml").read_text()
    assert text == kserve.docs_example_yaml(), (
        "docs/kserve-inferenceservice.yaml differs from bnexport.serve.kserve."
        "docs_example_yaml(); regenerate it with the command in its first lines"
    )


def _predictor_container(doc: dict) -> dict:
    pred = doc["spec"]["predictor"]
    return pred["model"] if "model" in pred else pred["containers"][0]


def test_runtime_fields_kserve_reads():
    runtime, isvc, custom, triton = yaml.safe_load_all(kserve.docs_example_yaml())
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    assert spec["supportedModelFormats"] == [{"name": "onnx", "version": "1", "autoSelect": False}]
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container" and c["command"] == ["bnexport", "serve"]
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("http1", 8080), ("h2c", 8081)]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert spec["annotations"] == {
        "prometheus.kserve.io/port": "8080",
        "prometheus.kserve.io/path": "/metrics",
    }
    for doc in (isvc, custom, triton):
        notes = doc["metadata"]["annotations"]
        assert notes["serving.kserve.io/enable-prometheus-scraping"] == "true"
        assert notes["serving.kserve.io/deploymentMode"] == "RawDeployment"
        pred = doc["spec"]["predictor"]
        assert pred["serviceAccountName"] == "bnexport-storage"
        assert (pred["minReplicas"], pred["maxReplicas"], pred["scaleMetric"]) == (1, 4, "cpu")
    assert isvc["spec"]["predictor"]["model"]["runtime"] == "bnexport"
    env = {e["name"]: e.get("value") for e in custom["spec"]["predictor"]["containers"][0]["env"]}
    assert env["PROTOCOL"] == "v2" and env["STORAGE_URI"] == "s3://my-bucket/bnexport/triton-repo"


def _args(doc: dict) -> list[str]:
    return _predictor_container(doc).get("args", [])


def test_gpu_only_for_gpu_models(written):
    def gpu_requested(doc):
        return "nvidia.com/gpu" in _predictor_container(doc)["resources"]["limits"]

    cpu_triton = _docs(written["cpu"] / "kserve-inferenceservice.yaml")
    cpu_runtime, cpu_isvc = _docs(written["cpu"] / "kserve-bnexport.yaml")
    assert not gpu_requested(cpu_triton[0]) and not gpu_requested(cpu_isvc)
    assert "nvidia.com/gpu" not in json.dumps(cpu_runtime)
    assert not any("cuda" in a for a in _args(cpu_isvc))
    gpu_triton = _docs(written["gpu"] / "kserve-inferenceservice.yaml")
    _, gpu_isvc = _docs(written["gpu"] / "kserve-bnexport.yaml")
    assert gpu_requested(gpu_triton[0]) and gpu_requested(gpu_isvc)
    assert "--device=cuda" in _args(gpu_isvc)
    (trt,) = _docs(written["trt"] / "kserve-inferenceservice.yaml")
    assert gpu_requested(trt) and not (written["trt"] / "kserve-bnexport.yaml").exists()


def test_scaling_matches_server_bounds(written):
    _, isvc = _docs(written["cpu"] / "kserve-bnexport.yaml")
    pred = isvc["spec"]["predictor"]
    args = dict(a.split("=", 1) for a in _args(isvc))
    assert args["--max-batch"] == "8"  # triton-repo --max-batch 8, the config's max_batch_size
    assert int(args["--max-inflight-requests"]) == pred["containerConcurrency"] >= 8
    assert pred["scaleMetric"] == "cpu" and 1 <= pred["scaleTarget"] <= 100
    with pytest.raises(UsageError, match="max_inflight_requests=4 .*max_batch=8"):
        kserve.bnexport_isvc_yaml("m", "s3://b", max_batch=8, max_inflight_requests=4)
    with pytest.raises(UsageError, match="max_replicas=1 "):
        kserve.bnexport_isvc_yaml("m", "s3://b", min_replicas=2, max_replicas=1)


def test_storage_uri_quoted(written):
    (doc,) = _docs(written["cpu"] / "kserve-inferenceservice.yaml")
    assert doc["spec"]["predictor"]["model"]["storageUri"] == "s3://b/m x"
    assert (
        'storageUri: "s3://b/m x"' in (written["cpu"] / "kserve-inferenceservice.yaml").read_text()
    )
    tricky = 's3://b/a: b # "c"'
    (doc,) = yaml.safe_load_all(kserve.triton_isvc_yaml("m", tricky))
    assert doc["spec"]["predictor"]["model"]["storageUri"] == tricky
    with pytest.raises(UsageError, match="storage_uri"):
        kserve.triton_isvc_yaml("m", "s3://b\nkind: Secret")


@pytest.mark.parametrize(
    "name", ["Digits", "1digits", "digits-", "dig_its", "d" * 54, "", "dígits"]
)
def test_names_are_dns1035_labels(name):
    with pytest.raises(UsageError, match=r"^--kserve-name '.*' is not a DNS-1035 label"):
        kserve.resolve_name(name, "digits")


def test_cli_bad_name_is_one_line_exit_2(tmp_path, capsys):
    src = tmp_path / "9lives.onnx"
    onnx.save(digits_cnn(0), src)
    out = tmp_path / "repo"
    code = main(["triton-repo", str(src), str(out), "--kserve", "s3://b/m"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "--kserve-name (default: model name '9lives'" in err and "DNS-1035" in err
    assert not out.exists()  # refused before anything was written
    code = main(["triton-repo", str(src), str(out), "--kserve", "s3://b/m", "--kserve-name", "Bad"])
    assert code == 2 and "--kserve-name 'Bad'" in capsys.readouterr().err
    assert (
        main(["triton-repo", str(src), str(out), "--kserve", "s3://b/m", "--kserve-name", "ok"])
        == 0
    )
    (isvc,) = _docs(out / "kserve-inferenceservice.yaml")
    assert isvc["metadata"]["name"] == "ok"


def _containerfile_command() -> list[str]:
    """ENTRYPOINT + CMD of the Containerfile (exec form, JSON arrays)."""
    found = {}
    for line in (ROOT / "Containerfile").read_text().splitlines():
        word, _, rest = line.partition(" ")
        if word in ("ENTRYPOINT", "CMD"):
            found[word] = json.loads(rest)
    return found["ENTRYPOINT"] + found["CMD"]


def test_containerfile_recipe():
    text = (ROOT / "Containerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)
    assert 'pip install ".[${EXTRAS}]"' in text and "ARG EXTRAS=serve" in text
    assert re.search(r"^USER 10001$", text, re.M)  # numeric: runAsNonRoot can check it
    assert re.search(r"^EXPOSE 8080 8081$", text, re.M)


def _localize(cmd: list[str], model: Path, ports: dict[int, int]) -> list[str]:
    """The pod's command on this machine: model path, loopback, free ports, this Python."""
    out = []
    for arg in cmd:
        arg = arg.replace(kserve.MODEL_DIR, str(model)).replace("0.0.0.0", "127.0.0.1")
        m = re.fullmatch(r"(--(?:grpc-)?port)=(\d+)", arg)
        out.append(f"{m[1]}={ports[int(m[2])]}" if m else arg)
    exe = shutil.which("bnexport", path=str(Path(sys.executable).parent))
    head = [exe] if exe else [sys.executable, "-m", "bnexport"]
    assert out[0] == "bnexport"
    return head + out[1:]


def _wait_probe(url: str, proc: subprocess.Popen, deadline_s: float = 90) -> float:
    """Seconds until ``url`` answers 200 (a probe of the pod's container)."""
    start = time.monotonic()

    def answers() -> bool:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        return False

    wait_until(answers, deadline_s, interval=0.2, message=f"{url} never answered 200")
    return time.monotonic() - start


def test_manifest_command_and_probes_serve_the_model(written):
    """Run the pod's container command (runtime + ISVC args) against the repository."""
    runtime, isvc = _docs(written["cpu"] / "kserve-bnexport.yaml")
    container = runtime["spec"]["containers"][0]
    cmd = container["command"] + container["args"] + isvc["spec"]["predictor"]["model"]["args"]
    # one command everywhere: Containerfile, runtime, custom container
    assert _containerfile_command() == container["command"] + container["args"]
    _, docs_isvc, custom, _ = yaml.safe_load_all(kserve.docs_example_yaml())
    c = custom["spec"]["predictor"]["containers"][0]
    assert c["command"] + c["args"] == (
        container["command"] + container["args"] + docs_isvc["spec"]["predictor"]["model"]["args"]
    )
    ports = {p["containerPort"]: free_port() for p in container["ports"]}
    (secret,) = [e for e in container["env"] if e["name"] == "BNEXPORT_SERVE_TOKEN"]
    assert secret["valueFrom"]["secretKeyRef"] == {"name": "bnexport-serve", "key": "token"}
    env = {**os.environ, "BNEXPORT_SERVE_TOKEN": TOKEN, "GRPC_VERBOSITY": "ERROR"}
    repo = written["cpu"]  # the folder uploaded to storageUri = /mnt/models in the pod
    proc = subprocess.Popen(
        _localize(cmd, repo, ports),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:

        def url(probe: dict) -> str:
            get = probe["httpGet"]
            return f"http://127.0.0.1:{ports[get['port']]}{get['path']}"

        _wait_probe(url(container["readinessProbe"]), proc)
        assert httpx.get(url(container["livenessProbe"])).status_code == 200
        assert httpx.get(url(container["startupProbe"])).status_code == 200
        http = f"http://127.0.0.1:{ports[8080]}"
        x = images(3, seed=5)
        body = infer_json_body(x)
        infer = f"{http}/v2/models/digits_v2/infer"
        assert httpx.post(infer, json=body).status_code == 401  # the token still guards
        res = httpx.post(infer, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert res.status_code == 200, res.text
        (probs,) = [o for o in res.json()["outputs"] if o["name"] == "probs"]
        got = np.asarray(probs["data"], np.float32).reshape(probs["shape"])
        np.testing.assert_allclose(got, digits_reference(x, 0)["probs"], RTOL, ATOL)
        # gRPC on the h2c port
        import tritonclient.grpc as grpcclient

        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{ports[8081]}")
        assert grpc.is_server_ready()
        # Prometheus scrapes port/path from the runtime's annotations, with no credentials
        notes = runtime["spec"]["annotations"]
        port = ports[int(notes["prometheus.kserve.io/port"])]
        scrape = httpx.get(f"http://127.0.0.1:{port}{notes['prometheus.kserve.io/path']}")
        assert scrape.status_code == 200, scrape.text
        assert metric(scrape.text, "bnexport_requests_total", model="digits_v2") == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_open_metrics_opens_metrics_only(tmp_path):
    """``--open-metrics``: GET /metrics without the token; nothing else, no other method."""
    (tmp_path / "digits" / "1").mkdir(parents=True)
    onnx.save(digits_cnn(0), tmp_path / "digits" / "1" / "model.onnx")
    with running_server(make_app(tmp_path, token=TOKEN, open_metrics=True)) as url:
        assert httpx.get(f"http://{url}/metrics").status_code == 200
        assert httpx.get(f"http://{url}/v2/models/digits").status_code == 401
        assert httpx.post(f"http://{url}/metrics", content=b"x").status_code == 401
        for path in ("/metrics/", "/metricsx", "/v2/metrics"):
            assert httpx.get(f"http://{url}{path}").status_code == 401, path
    with running_server(make_app(tmp_path, token=TOKEN)) as url:  # default: closed
        assert httpx.get(f"http://{url}/metrics").status_code == 401


def _pod_commands(written) -> dict[str, list[str]]:
    """The kserve-container command of every bnexport pod, as KServe merges it."""
    runtime, *_ = yaml.safe_load_all(kserve.runtime_yaml())
    base = runtime["spec"]["containers"][0]
    cmds = {}
    for label in ("cpu", "gpu"):
        _, isvc = _docs(written[label] / "kserve-bnexport.yaml")
        cmds[label] = base["command"] + base["args"] + isvc["spec"]["predictor"]["model"]["args"]
    for gpu in (False, True):
        (doc,) = yaml.safe_load_all(kserve.custom_container_isvc_yaml("m", "s3://b", gpu=gpu))
        c = doc["spec"]["predictor"]["containers"][0]
        cmds[f"custom gpu={gpu}"] = c["command"] + c["args"]
    return cmds


def test_every_pod_command_parses(written):
    """Each command's flags exist in ``bnexport serve`` (a GPU one with --device cuda)."""
    from bnexport.cli.main import build_parser

    for label, cmd in _pod_commands(written).items():
        assert cmd[:2] == ["bnexport", "serve"], label
        args = build_parser().parse_args(cmd[1:])
        gpu = "gpu" in label and "gpu=False" not in label
        assert args.device == ("cuda" if gpu else "cpu"), label
        assert (args.host, args.port, args.grpc_port, args.open_metrics) == (
            "0.0.0.0",
            8080,
            8081,
            True,
        ), label
        assert args.model == kserve.MODEL_DIR and args.max_inflight_requests >= args.max_batch


def test_isvc_matches_its_runtime(written):
    """What KServe's controller checks when it picks the runtime of an InferenceService."""
    pairs = [_docs(written[label] / "kserve-bnexport.yaml") for label in ("cpu", "gpu")]
    runtime, isvc, custom, _ = yaml.safe_load_all(kserve.docs_example_yaml())
    pairs.append([runtime, isvc])
    for runtime, isvc in pairs:
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"] == kserve.RUNTIME_NAME
        formats = runtime["spec"]["supportedModelFormats"]
        assert model["modelFormat"]["name"] in [f["name"] for f in formats]
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        gpu = "nvidia.com/gpu" in model["resources"]["limits"]
        assert gpu == ("--device=cuda" in model["args"])
    assert custom["spec"]["predictor"]["containers"][0]["name"] == "kserve-container"
