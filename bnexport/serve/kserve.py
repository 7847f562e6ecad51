"""KServe manifests for bnexport models: a ``ClusterServingRuntime`` and ``InferenceService``s.

Written for the KServe v0.14-v0.16 CRD schemas (tests validate every manifest against
the vendored schemas, unknown fields failing, and run the container command they hold).

The manifests, one function each (the last three are three ways to deploy a model):

- :func:`runtime_yaml`: a ``ClusterServingRuntime`` named ``bnexport`` that runs
  ``bnexport serve /mnt/models`` (``command``, so the image's entrypoint does not matter)
  with HTTP on 8080 and gRPC on an ``h2c`` port 8081, probes on ``/v2/health/ready|live``,
  ``protocolVersions: [v2, grpc-v2]`` and the metrics port/path annotations KServe reads
  (``prometheus.kserve.io/port|path``). The server is started with ``--open-metrics`` so
  the scrape, which carries no credentials, is not answered 401 by the token check.
- :func:`bnexport_isvc_yaml`: an ``InferenceService`` on that runtime. KServe appends
  ``predictor.model.args`` to the runtime's args, so the per-model settings live here.
- :func:`custom_container_isvc_yaml`: the same server as a custom container
  (``PROTOCOL=v2`` tells KServe its protocol, ``STORAGE_URI`` its model), no runtime needed.
- :func:`triton_isvc_yaml`: Triton (KServe's own ``kserve-tritonserver`` runtime) serving
  a repository written by ``bnexport triton-repo``.

Deployment mode: ``RawDeployment`` (renamed ``Standard`` in v0.16, which still accepts
the old name): a Kubernetes Deployment + Service + HPA, no Knative. It is the mode that
serves a second (gRPC ``h2c``) port; Knative allows one container port.

Scaling (the HPA scales on what a Deployment can measure, CPU, in this mode):

- ``minReplicas``/``maxReplicas``; ``scaleMetric: cpu`` with ``scaleTarget`` percent.
  A batching server under load runs merged batches back to back, so its CPU use is the
  signal that a replica is full; requests beyond it queue in the batcher.
- ``containerConcurrency`` = the server's ``--max-inflight-requests`` (both set from one
  number): a proxy in front (Knative's queue-proxy, if the mode is switched) then never
  admits more than the server would take, and it is at least ``--max-batch``, else a full
  batch could never form.
- The annotation ``autoscaling.knative.dev/class: hpa.autoscaling.knative.dev`` is there
  for v0.16: its webhook validates an ISVC annotated ``RawDeployment`` (not ``Standard``)
  with Knative's rules, which refuse ``scaleMetric: cpu``, unless that class says HPA.

Metrics: ``serving.kserve.io/enable-prometheus-scraping: "true"`` on each ISVC and the
port/path annotations. KServe's pod webhook then writes ``prometheus.io/port`` as
queue-proxy's 9091, which only exists in Knative mode; in this mode scrape the pods with
a PodMonitor on port ``http1``, path ``/metrics`` (README, "KServe").

GPU: only a model that needs one asks for ``nvidia.com/gpu`` (a TensorRT plan, or
instances of kind GPU); the bnexport server then runs with ``--device=cuda``. A CPU
onnxruntime model never requests a GPU.

Names are DNS-1035 labels (KServe derives Service and host names from them); a bad
one is a :class:`~bnexport.errors.UsageError` naming the field. User strings (storage
URI, image, service account) are written as double-quoted YAML scalars.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from bnexport import __version__
from bnexport.errors import UsageError
from bnexport.serve.settings import TOKEN_ENV, ServeSettings

__all__ = [
    "DEFAULT_IMAGE",
    "GRPC_PORT",
    "HTTP_PORT",
    "MODEL_DIR",
    "RUNTIME_NAME",
    "bnexport_isvc_yaml",
    "custom_container_isvc_yaml",
    "default_name",
    "dns1035",
    "docs_example_yaml",
    "isvc_name",
    "runtime_args",
    "resolve_name",
    "runtime_yaml",
    "server_args",
    "triton_isvc_yaml",
    "write_manifests",
]

#: name of the ClusterServingRuntime
RUNTIME_NAME = "bnexport"
#: image built from the repository's ``Containerfile`` (push it where your cluster pulls from)
DEFAULT_IMAGE = f"registry.example.com/bnexport-serve:{__version__}"
#: where KServe's storage initializer puts the model
MODEL_DIR = "/mnt/models"
HTTP_PORT = 8080
GRPC_PORT = 8081
METRICS_PATH = "/metrics"
#: the command of the runtime, the custom container and the Containerfile (ENTRYPOINT + CMD)
SERVER_COMMAND = ("bnexport", "serve")
#: Knative's HPA class: see the module docstring (v0.16 validation of ``RawDeployment``)
_HPA_CLASS = "hpa.autoscaling.knative.dev"
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
#: KServe names the predictor Service ``<name>-predictor``: a label of at most 63 characters
_PREDICTOR_SUFFIX = "-predictor"
#: the server's defaults (``bnexport serve``'s): the manifests' defaults are the same
_D = ServeSettings()
#: the comment on the startup probe (its failure threshold x period)
_STARTUP_NOTE = "# model load and warm-up: up to 5 minutes"


def dns1035(value: str, field: str, max_len: int = 63) -> str:
    """``value`` if it is a DNS-1035 label (Kubernetes object names KServe derives hosts from).

    Raises:
        UsageError: one line naming ``field``: lower-case letters, digits and ``-``,
            starting with a letter, ending with a letter or digit, at most ``max_len``.
    """
    if not isinstance(value, str) or not _DNS1035.fullmatch(value) or len(value) > max_len:
        raise UsageError(
            f"{field} {value!r} is not a DNS-1035 label: lower-case letters, digits and '-', "
            f"starting with a letter and ending with a letter or digit, at most {max_len} "
            "characters"
        )
    return value


def isvc_name(value: str, field: str) -> str:
    """An InferenceService name: DNS-1035, short enough for ``<name>-predictor``."""
    return dns1035(value, field, 63 - len(_PREDICTOR_SUFFIX))


def _q(value: str) -> str:
    """A double-quoted YAML scalar (JSON strings are valid YAML)."""
    return json.dumps(str(value))


def _text(value: str, field: str) -> str:
    if not value or any(c in value for c in "\n\r\0"):
        raise UsageError(f"{field} must be a non-empty single-line string. Received: {value!r}")
    return value


def server_args(
    *, max_batch: int, batch_timeout_ms: float, max_inflight_requests: int, gpu: bool
) -> list[str]:
    """Per-model ``bnexport serve`` arguments (KServe appends them to the runtime's args)."""
    args = [
        f"--max-batch={max(1, max_batch)}",
        f"--batch-timeout-ms={batch_timeout_ms:g}",
        f"--max-inflight-requests={max_inflight_requests}",
    ]
    if gpu:
        args.append("--device=cuda")
    return args


def runtime_args() -> list[str]:
    """Arguments of the runtime's ``bnexport serve``: model folder, bind, ports, open metrics."""
    return [
        MODEL_DIR,
        "--host=0.0.0.0",
        f"--port={HTTP_PORT}",
        f"--grpc-port={GRPC_PORT}",
        "--open-metrics",
    ]


def _flow(items: list[str]) -> str:
    return "[" + ", ".join(_q(i) for i in items) + "]"


def _container_body(
    indent: str, *, image: str, args: list[str], resources: str, env: str = ""
) -> str:
    """Fields of the ``kserve-container`` shared by the runtime and the custom container."""
    p = indent
    probes = (
        _probe(p, "startupProbe:", "live", period=5, failures=60, note=_STARTUP_NOTE)
        + _probe(p, "readinessProbe:", "ready", period=5, failures=2)
        + _probe(p, "livenessProbe:", "live", period=10, failures=3, timeout=5)
    )
    return f"""{p}image: {_q(image)}
{p}command: {_flow(list(SERVER_COMMAND))}
{p}args: {_flow(args)}
{p}env:
{env}{p}  - name: {TOKEN_ENV}   # the bearer token (default of --token)
{p}    valueFrom:
{p}      secretKeyRef:
{p}        name: bnexport-serve
{p}        key: token
{p}ports:
{p}  - name: http1
{p}    containerPort: {HTTP_PORT}
{p}    protocol: TCP
{p}  - name: h2c                 # gRPC (KServe v2 / Triton GRPCInferenceService)
{p}    containerPort: {GRPC_PORT}
{p}    protocol: TCP
{probes}{p}securityContext:
{p}  runAsNonRoot: true
{p}  allowPrivilegeEscalation: false
{resources}"""


def _probe(
    indent: str,
    key: str,
    health: str,
    *,
    period: int,
    failures: int,
    timeout: int | None = None,
    note: str = "",
) -> str:
    """One HTTP probe of the container on ``/v2/health/<health>``."""
    p = indent
    head = f"{key:<30}{note}".rstrip()
    timeout_line = f"{p}  timeoutSeconds: {timeout}\n" if timeout is not None else ""
    return f"""{p}{head}
{p}  httpGet:
{p}    path: /v2/health/{health}
{p}    port: {HTTP_PORT}
{p}  periodSeconds: {period}
{timeout_line}{p}  failureThreshold: {failures}
"""


def _resources(indent: str, gpu: bool) -> str:
    p = indent
    gpu_line = f'\n{p}    nvidia.com/gpu: "1"' if gpu else ""
    return f"""{p}resources:
{p}  requests:
{p}    cpu: "2"
{p}    memory: 2Gi
{p}  limits:
{p}    cpu: "4"
{p}    memory: 4Gi{gpu_line}
"""


def runtime_yaml(image: str = DEFAULT_IMAGE) -> str:
    """The ``bnexport`` ``ClusterServingRuntime`` (apply once per cluster, as cluster admin)."""
    image = _text(image, "image")
    body = _container_body(
        "      ", image=image, args=runtime_args(), resources=_resources("      ", False)
    )
    return f"""# The bnexport server as a KServe ClusterServingRuntime (KServe v0.14-v0.16).
# Apply once per cluster; InferenceServices select it with `runtime: {RUNTIME_NAME}`.
# Image: build the repository's Containerfile and push it where the cluster pulls from.
# The token comes from the Secret bnexport-serve (key `token`) in the ISVC's namespace:
#   kubectl create secret generic bnexport-serve --from-literal=token=$(openssl rand -hex 24)
apiVersion: serving.kserve.io/v1alpha1
kind: ClusterServingRuntime
metadata:
  name: {RUNTIME_NAME}
spec:
  annotations:                         # copied to the pods: where KServe's scraping looks
    prometheus.kserve.io/port: "{HTTP_PORT}"
    prometheus.kserve.io/path: {METRICS_PATH}
  supportedModelFormats:
    - name: onnx                       # one .onnx, or a <model>/<version>/model.onnx repository
      version: "1"
      autoSelect: false                # chosen by name only, other onnx runtimes keep theirs
  protocolVersions:
    - v2
    - grpc-v2
  multiModel: false
  containers:
    - name: kserve-container
{body}"""


def _scaling(indent: str, min_replicas: int, max_replicas: int, target: int) -> str:
    p = indent
    return f"""{p}minReplicas: {min_replicas}
{p}maxReplicas: {max_replicas}
{p}scaleMetric: cpu                 # the HPA's metric in RawDeployment/Standard mode
{p}scaleTarget: {target}                  # percent of the CPU request
"""


def _annotations(metrics_port_path: bool = False) -> str:
    extra = (
        f"""    prometheus.kserve.io/port: "{HTTP_PORT}"
    prometheus.kserve.io/path: {METRICS_PATH}
"""
        if metrics_port_path
        else ""
    )
    return f"""  annotations:
    serving.kserve.io/deploymentMode: RawDeployment     # "Standard" from v0.16 on
    serving.kserve.io/autoscalerClass: hpa
    autoscaling.knative.dev/class: {_HPA_CLASS}   # v0.16 validates RawDeployment by it
    serving.kserve.io/enable-prometheus-scraping: "true"
{extra}"""


def _check_scaling(
    max_batch: int, max_inflight_requests: int, min_replicas: int, max_replicas: int, target: int
) -> None:
    bad = []
    if max_inflight_requests < max(1, max_batch):
        bad.append(
            f"max_inflight_requests={max_inflight_requests} (>= max_batch={max_batch}, "
            "else a full batch never forms)"
        )
    if min_replicas < 1:
        bad.append(f"min_replicas={min_replicas} (>= 1)")
    if max_replicas < min_replicas:
        bad.append(f"max_replicas={max_replicas} (>= min_replicas={min_replicas})")
    if not 1 <= target <= 100:
        bad.append(f"scale_target={target} (CPU percent, 1..100)")
    if bad:
        raise UsageError("kserve: invalid argument(s). Received: " + ", ".join(bad))


def _isvc_head(
    name: str,
    storage_uri: str,
    service_account: str,
    name_field: str,
    replicas: tuple[int, int, int],
    *,
    max_batch: int | None = None,
    max_inflight_requests: int | None = None,
    metrics_port_path: bool = False,
) -> tuple[str, str]:
    """Check what every InferenceService shares; return its storage URI and its head.

    The head runs from ``apiVersion`` through the predictor's scaling and, for the
    bnexport server (``max_inflight_requests`` given), its ``containerConcurrency``.
    ``replicas`` is ``(min_replicas, max_replicas, scale_target)``.
    """
    name = isvc_name(name, name_field)
    account = dns1035(service_account, "service_account", 253)
    uri = _text(storage_uri, "storage_uri")
    inflight = 1 if max_inflight_requests is None else max_inflight_requests
    _check_scaling(1 if max_batch is None else max_batch, inflight, *replicas)
    concurrency = (
        f"    containerConcurrency: {max_inflight_requests}       # = --max-inflight-requests\n"
        if max_inflight_requests is not None
        else ""
    )
    head = f"""apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {name}
{_annotations(metrics_port_path)}spec:
  predictor:
    serviceAccountName: {_q(account)}
{_scaling("    ", *replicas)}{concurrency}"""
    return uri, head


def bnexport_isvc_yaml(
    name: str,
    storage_uri: str,
    *,
    gpu: bool = False,
    max_batch: int = _D.max_batch,
    batch_timeout_ms: float = _D.batch_timeout_ms,
    max_inflight_requests: int = _D.max_inflight_requests,
    min_replicas: int = 1,
    max_replicas: int = 4,
    scale_target: int = 70,
    service_account: str = "bnexport-storage",
    name_field: str = "name",
) -> str:
    """An ``InferenceService`` served by the ``bnexport`` runtime.

    Args:
        name: InferenceService name (DNS-1035, at most 53 characters).
        storage_uri: the model or repository folder (``s3://``, ``gs://``, ``pvc://``...).
        gpu: request ``nvidia.com/gpu: 1`` and run with ``--device=cuda``.
        max_batch: ``--max-batch`` (the repository's ``max_batch_size``; 0 means 1).
        batch_timeout_ms: ``--batch-timeout-ms``.
        max_inflight_requests: ``--max-inflight-requests`` and ``containerConcurrency``.
        min_replicas: ``minReplicas``.
        max_replicas: ``maxReplicas``.
        scale_target: ``scaleTarget`` (CPU percent).
        service_account: a ServiceAccount holding the storage credentials (placeholder).
        name_field: how the caller calls the name, for the error message.

    Raises:
        UsageError: a name that is not a DNS-1035 label, inconsistent scaling numbers.
    """
    uri, head = _isvc_head(
        name,
        storage_uri,
        service_account,
        name_field,
        (min_replicas, max_replicas, scale_target),
        max_batch=max_batch,
        max_inflight_requests=max_inflight_requests,
    )
    args = server_args(
        max_batch=max_batch,
        batch_timeout_ms=batch_timeout_ms,
        max_inflight_requests=max_inflight_requests,
        gpu=gpu,
    )
    return f"""# InferenceService on the bnexport ClusterServingRuntime (apply the runtime first).
# {_q(uri)} is copied to {MODEL_DIR} by KServe's storage initializer, with the
# credentials of the ServiceAccount below (replace the placeholder; see KServe's docs on
# S3/GCS secrets). The Secret bnexport-serve (key `token`) must exist in this namespace.
{head}\
    model:
      runtime: {RUNTIME_NAME}
      modelFormat:
        name: onnx
      protocolVersion: v2
      storageUri: {_q(uri)}
      args: {_flow(args)}       # appended to the runtime's
{_resources("      ", gpu)}"""


def custom_container_isvc_yaml(
    name: str,
    storage_uri: str,
    *,
    image: str = DEFAULT_IMAGE,
    gpu: bool = False,
    max_batch: int = _D.max_batch,
    batch_timeout_ms: float = _D.batch_timeout_ms,
    max_inflight_requests: int = _D.max_inflight_requests,
    min_replicas: int = 1,
    max_replicas: int = 4,
    scale_target: int = 70,
    service_account: str = "bnexport-storage",
    name_field: str = "name",
) -> str:
    """The same server as a custom predictor container (no ServingRuntime needed).

    Arguments as :func:`bnexport_isvc_yaml`, plus ``image``. ``PROTOCOL=v2`` tells KServe
    the protocol of a custom container (it assumes v1 otherwise); ``STORAGE_URI`` makes
    its storage initializer download the model to ``/mnt/models``.
    """
    image = _text(image, "image")
    uri, head = _isvc_head(
        name,
        storage_uri,
        service_account,
        name_field,
        (min_replicas, max_replicas, scale_target),
        max_batch=max_batch,
        max_inflight_requests=max_inflight_requests,
        metrics_port_path=True,
    )
    args = runtime_args() + server_args(
        max_batch=max_batch,
        batch_timeout_ms=batch_timeout_ms,
        max_inflight_requests=max_inflight_requests,
        gpu=gpu,
    )
    env = f"""          - name: PROTOCOL      # a custom container's protocol (KServe assumes v1)
            value: v2
          - name: STORAGE_URI   # downloaded to {MODEL_DIR} by the storage initializer
            value: {_q(uri)}
"""
    body = _container_body(
        "        ", image=image, args=args, resources=_resources("        ", gpu), env=env
    )
    return f"""# The bnexport server as a KServe custom predictor container (no runtime needed).
{head}\
    containers:
      - name: kserve-container
{body}"""


def triton_isvc_yaml(
    name: str,
    storage_uri: str,
    *,
    gpu: bool = False,
    runtime_version: str = "24.08-py3",
    min_replicas: int = 1,
    max_replicas: int = 4,
    scale_target: int = 70,
    service_account: str = "bnexport-storage",
    name_field: str = "name",
) -> str:
    """An ``InferenceService`` serving a ``triton-repo`` folder with KServe's Triton runtime.

    Args:
        name: InferenceService name (DNS-1035, at most 53 characters).
        storage_uri: where the repository folder is uploaded.
        gpu: request ``nvidia.com/gpu: 1`` (TensorRT plans, ``KIND_GPU`` instances).
        runtime_version: tag of the ``tritonserver`` image.
        min_replicas: ``minReplicas``.
        max_replicas: ``maxReplicas``.
        scale_target: ``scaleTarget`` (CPU percent).
        service_account: a ServiceAccount holding the storage credentials (placeholder).
        name_field: how the caller calls the name, for the error message.
    """
    version = _text(runtime_version, "runtime_version")
    uri, head = _isvc_head(
        name, storage_uri, service_account, name_field, (min_replicas, max_replicas, scale_target)
    )
    return f"""# Triton (KServe's kserve-tritonserver runtime) serving a repository written by
#   bnexport triton-repo MODEL.onnx OUT_DIR
# Upload OUT_DIR to {_q(uri)} first (the folder that holds <model>/config.pbtxt).
{head}\
    model:
      modelFormat:
        name: triton
      protocolVersion: v2
      runtimeVersion: {_q(version)}
      storageUri: {_q(uri)}
{_resources("      ", gpu)}"""


def docs_example_yaml() -> str:
    """The text of ``docs/kserve-inferenceservice.yaml`` (a test keeps the file equal to it)."""
    uri = "s3://my-bucket/bnexport/triton-repo"
    head = """# KServe manifests for bnexport (KServe v0.14-v0.16), generated by
#   python -c "from bnexport.serve.kserve import docs_example_yaml as d; print(d(), end='')"
# tests/serve/test_kserve_manifests.py validates every document against KServe's CRD
# schemas and runs the container command against a model. Pick ONE InferenceService.
"""
    docs = [
        runtime_yaml(),
        bnexport_isvc_yaml("digits", uri),
        custom_container_isvc_yaml("digits-custom", uri),
        triton_isvc_yaml("digits-triton", uri),
    ]
    return head + "\n" + "---\n".join(docs)


def default_name(model_name: str) -> str:
    """The InferenceService name derived from a model name (lower case, ``_``/``.`` as ``-``)."""
    return model_name.lower().replace("_", "-").replace(".", "-")


def resolve_name(
    name: str | None, model_name: str, name_field: str = "--kserve-name"
) -> tuple[str, str]:
    """The InferenceService name (given, or derived from ``model_name``), validated.

    Returns:
        The name and how to call it in an error message.

    Raises:
        UsageError: not a DNS-1035 label of at most 53 characters; the message names
            ``name_field`` and, for a derived name, the model name it came from.
    """
    if name is not None:
        return isvc_name(name, name_field), name_field
    field = f"{name_field} (default: model name {model_name!r} lower-cased, '_' and '.' as '-')"
    return isvc_name(default_name(model_name), field), field


def write_manifests(
    out_dir: str | os.PathLike,
    storage_uri: str,
    *,
    model_name: str,
    backend: str = "onnxruntime",
    instance_kind: str = "auto",
    max_batch: int = _D.max_batch,
    batch_timeout_ms: float = _D.batch_timeout_ms,
    name: str | None = None,
    name_field: str = "--kserve-name",
) -> tuple[list[Path], list[str]]:
    """Write the KServe manifests of a ``triton-repo`` folder uploaded to ``storage_uri``.

    ``OUT_DIR/kserve-inferenceservice.yaml``: Triton serving the repository.
    ``OUT_DIR/kserve-bnexport.yaml``: the ``bnexport`` ClusterServingRuntime and an
    InferenceService ``<name>-bnexport`` on it (onnxruntime repositories only: the
    bnexport server loads ``model.onnx``, not a TensorRT plan). A GPU is requested only
    for a TensorRT plan or ``KIND_GPU`` instances.

    Returns:
        The files written and notes for the user.

    Raises:
        UsageError: the name (given or derived from ``model_name``) is not a DNS-1035 label.
    """
    from bnexport.atomic_write import write_text_atomic

    isvc, field = resolve_name(name, model_name, name_field)
    gpu = backend == "tensorrt" or instance_kind == "gpu"
    out = Path(out_dir)
    triton_path = out / "kserve-inferenceservice.yaml"
    write_text_atomic(triton_path, triton_isvc_yaml(isvc, storage_uri, gpu=gpu, name_field=field))
    written, notes = [triton_path], []
    if backend == "onnxruntime":
        path = out / "kserve-bnexport.yaml"
        text = (
            runtime_yaml()
            + "---\n"
            + bnexport_isvc_yaml(
                f"{isvc}-bnexport",
                storage_uri,
                gpu=gpu,
                max_batch=max_batch,
                batch_timeout_ms=batch_timeout_ms,
                name_field=f"{field} + '-bnexport'",
            )
        )
        write_text_atomic(path, text)
        written.append(path)
    else:
        notes.append(
            "kserve-bnexport.yaml not written: the bnexport server loads model.onnx, and this "
            "repository holds a TensorRT plan for Triton"
        )
    return written, notes
