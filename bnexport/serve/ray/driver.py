"""Start, resize and stop bnexport's server as Ray Serve replicas.

:class:`RayServer` is the driver: it starts a private Ray on this machine (no
dashboard; or joins ``--ray-address``), starts Ray Serve's HTTP proxy on
``host:port`` and its gRPC proxy on ``grpc_port``, and the metrics board (see
:mod:`bnexport.serve.ray.metrics_board`); it deploys
:class:`~bnexport.serve.ray.replica.BnexportReplica` and waits until every replica
has loaded its models and answers. On stop it deletes the application (Ray stops
routing to the replicas, lets the requests in flight finish within
``graceful_timeout_s``, then each replica's app drains its batchers), shuts Serve
down and, if it started Ray, Ray too.

What the one-process server does and Ray's proxies do instead:

- ``header_timeout_s`` and ``keep_alive_s``: Ray's HTTP proxy (uvicorn) reads the
  headers and holds the connections; it has no header timeout, and its keep-alive
  is Ray's ``keep_alive_timeout_s`` (set from ``keep_alive_s``).
- ``max_body_mb`` on gRPC: Ray's gRPC proxy takes messages up to
  ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`` (set from ``max_body_mb`` for the local Ray);
  the HTTP body limit, body timeout, token and in-flight bound stay in each replica.
- ``max_inflight_requests`` also caps the requests Ray sends one replica at once
  (``max_ongoing_requests``; Ray's default of 5 would starve dynamic batching).
- ``graceful_timeout_s`` is the deployment's ``graceful_shutdown_timeout_s``.

Listeners: the HTTP proxy binds ``host`` (loopback by default). Ray 2.60 has no host
option for the rest and binds it on every interface: its gRPC proxy (``[::]``), the
GCS, raylet, worker and agent ports (it replaces a node address of 127.0.0.1 with the
machine's). Ray's GCS refuses clients without the cluster token Ray writes to
``~/.ray/auth_token``; the gRPC proxy is guarded only by bnexport's ``token`` (a
warning says so).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bnexport.errors import BnexportError, MissingExtraError, UsageError
from bnexport.extras import install_hint
from bnexport.serve.ray.options import APP_NAME, NAMESPACE, ReplicaOptions
from bnexport.serve.settings import TOKEN_ENV, ServeSettings

#: Ray Serve's gRPC proxy calls this to register the KServe v2 service
GRPC_SERVICER_FUNCTION = "bnexport.serve.ray.grpc_ingress.add_inference_service"
#: how often the driver polls while it waits
_POLL_S = 0.2


class ReplicaStartError(BnexportError):
    """The replicas did not start (a model failed to load, or Ray could not place them)."""


class RayServer:
    """bnexport's KServe v2 server as Ray Serve replicas (a context manager).

    Args:
        path: an ``.onnx`` file or a model repository; replicas read it from the same
            path, so on a cluster it must exist on every node.
        settings: the server's settings (the one-process server's object).
        options: replicas, Ray address, GPUs, autoscaling.
        ready_timeout_s: how long :meth:`start` waits for every replica.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        settings: ServeSettings,
        options: ReplicaOptions | None = None,
        *,
        ready_timeout_s: float = 600.0,
    ) -> None:
        self.path = str(Path(path).resolve())
        self.settings = settings
        self.options = options or ReplicaOptions()
        self.ready_timeout_s = ready_timeout_s
        self._started_ray = False
        self._serve_started = False
        self._board: Any = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start (or join) Ray, the proxies and the replicas; return when all are ready.

        Raises:
            ReplicaStartError: a replica failed to load its model (the message is the
                replica's one line), or the replicas were not ready in time.
            MissingExtraError: Ray Serve is not installed.
        """
        if not self.options.ray_address and not Path(self.path).exists():
            raise UsageError(f"{self.path}: no such file or directory")
        try:
            self._start_ray()
            self._check_gpus()
            self._start_serve()
            self._start_metrics_board()
            self.deploy(self.options.replicas)
        except BaseException:
            self.stop()
            raise

    def deploy(self, replicas: int | None = None) -> None:
        """Deploy (or redeploy with ``replicas``) and wait until every replica is ready.

        A redeploy that only changes the count adds or drains replicas in place; requests
        keep being served by the others.
        """
        from ray import serve

        started = time.monotonic()
        app = self.application(replicas or self.options.replicas)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as exc:
            raise ReplicaStartError(_one_line(f"{exc}\n{_status_messages()}")) from None
        self._wait_ready(started + self.ready_timeout_s)

    def stop(self) -> None:
        """Drain and delete the replicas; stop Serve and Ray if this object started Ray.

        On a cluster joined with ``ray_address`` only this application is deleted: Serve
        and its proxies keep serving the cluster's other applications.
        """
        with contextlib.suppress(Exception):
            if self._serve_started:
                from ray import serve

                with contextlib.suppress(Exception):
                    serve.delete(APP_NAME, _blocking=True)
                if self._started_ray:
                    serve.shutdown()
        self._serve_started = False
        if self._board is not None:
            import ray

            with contextlib.suppress(Exception):
                ray.kill(self._board)
            self._board = None
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> RayServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``http://host:port`` of Ray's HTTP proxy, as a client on this machine writes it."""
        host = self.settings.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.settings.port}"

    @property
    def grpc_address(self) -> str | None:
        """``host:port`` of Ray's gRPC proxy, or ``None`` without ``grpc_port``."""
        if self.settings.grpc_port is None:
            return None
        return f"{self.url.removeprefix('http://').rsplit(':', 1)[0]}:{self.settings.grpc_port}"

    # -- pieces -----------------------------------------------------------------------------------
    def application(self, replicas: int) -> Any:
        """The Ray Serve application: :class:`BnexportReplica` with its options, bound."""
        from ray import serve

        from bnexport.serve.ray.replica import BnexportReplica

        s, o = self.settings, self.options
        options: dict[str, Any] = {
            "name": APP_NAME,
            "max_ongoing_requests": s.max_inflight_requests,
            "graceful_shutdown_timeout_s": s.graceful_timeout_s,
            "ray_actor_options": {"num_cpus": 1, "num_gpus": o.gpus_per_replica},
        }
        if o.autoscale is None:
            options["num_replicas"] = replicas
        else:
            low, high = o.autoscale
            options["autoscaling_config"] = {
                "min_replicas": low,
                "initial_replicas": replicas,
                "max_replicas": high,
                "target_ongoing_requests": o.target_ongoing_requests or s.max_batch,
            }
        return serve.deployment(BnexportReplica).options(**options).bind(self.path, s)

    def _start_ray(self) -> None:
        try:
            import ray
            import ray.serve  # noqa: F401 - ray without [serve] lacks its dependencies
        except ImportError as exc:
            raise MissingExtraError(
                f"serve --replicas needs Ray Serve ({exc.name} is not installed): "
                f"{install_hint('ray')}"
            ) from None
        if ray.is_initialized():
            return
        if self.options.ray_address:
            try:
                ray.init(address=self.options.ray_address, namespace=NAMESPACE, log_to_driver=False)
            except ConnectionError as exc:
                raise ReplicaStartError(
                    f"cannot join the Ray cluster at {self.options.ray_address}: {exc} (a "
                    "cluster with token authentication needs RAY_AUTH_MODE=token here and its "
                    "token in ~/.ray/auth_token)"
                ) from None
            return
        # a private Ray on loopback, sized so that every replica (plus one during a
        # rolling update) can be placed on this machine's logical CPUs
        cpus = max(os.cpu_count() or 1, self.options.most_replicas + 1)
        with _environ(RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=str(self.settings.max_body_bytes)):
            ray.init(
                address="local",
                num_cpus=cpus,
                include_dashboard=False,
                log_to_driver=False,
                namespace=NAMESPACE,
                _node_ip_address="127.0.0.1",
            )
        self._started_ray = True

    def _check_gpus(self) -> None:
        """A private Ray cannot grow: refuse GPUs it does not have instead of waiting forever."""
        import ray

        o = self.options
        needed = o.gpus_per_replica * o.most_replicas
        if not self._started_ray or needed <= 0:
            return
        have = ray.cluster_resources().get("GPU", 0)
        if have < needed:
            raise UsageError(
                f"--gpus-per-replica={o.gpus_per_replica} x {o.most_replicas} replicas needs "
                f"{needed:g} GPUs; this machine's Ray sees {have:g}"
            )

    def _start_serve(self) -> None:
        from ray import serve

        s = self.settings
        grpc_options: dict[str, Any] = {}
        if s.grpc_port is not None:
            from bnexport.serve.core.logs import get_logger

            get_logger().warning(
                "Ray Serve's gRPC proxy listens on every interface ([::]), whatever --host "
                "says (Ray has no host option for it)"
                + ("" if s.token else "; pass --token to require one on gRPC too"),
                extra={"fields": {"grpc_port": s.grpc_port}},
            )
            grpc_options = {
                "port": s.grpc_port,
                "grpc_servicer_functions": [GRPC_SERVICER_FUNCTION],
            }
        self._serve_started = True  # stop() shuts down whatever part of Serve started
        try:
            serve.start(
                proxy_location="HeadOnly" if self._started_ray else "EveryNode",
                http_options={
                    "host": s.host,
                    "port": s.port,
                    "keep_alive_timeout_s": max(1, round(s.keep_alive_s)),
                },
                grpc_options=grpc_options or None,
            )
        except Exception as exc:  # noqa: BLE001 - Ray wraps the proxy's error in its own
            last = _last_line(str(exc))
            if "bind" in last.lower():
                ports = f"--port {s.port}" + (
                    f" or --grpc-port {s.grpc_port}" if s.grpc_port is not None else ""
                )
                raise UsageError(
                    f"cannot listen on {s.host}: Ray Serve's proxy says {last!r} ({ports} in "
                    "use by another process?)"
                ) from None
            raise ReplicaStartError(f"Ray Serve did not start: {last}") from None

    def _start_metrics_board(self) -> None:
        """The actor the replicas share their metrics through (owned by this driver)."""
        import ray

        from bnexport.serve.ray.metrics_board import BOARD_NAME, MetricsBoard

        self._board = (
            ray.remote(num_cpus=0)(MetricsBoard)
            .options(name=BOARD_NAME, namespace=NAMESPACE, get_if_exists=True)
            .remote()
        )
        ray.get(self._board.texts.remote())  # started before the replicas look it up

    def _wait_ready(self, deadline: float) -> None:
        """Wait until ``/v2/health/ready`` answers 200 through Ray's HTTP proxy."""
        url = f"{self.url}/v2/health/ready"
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except OSError as exc:
                last = str(exc)
            time.sleep(_POLL_S)
        raise ReplicaStartError(f"replicas not ready at {url} in time ({last})")

    def model_names(self) -> list[str]:
        """Names of the models served (from the repository index, through the proxy)."""
        request = urllib.request.Request(f"{self.url}/v2/repository/index", data=b"{}")
        if self.settings.token:
            request.add_header("Authorization", f"Bearer {self.settings.token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return sorted({entry["name"] for entry in json.load(response)})


def _one_line(ray_error: str) -> str:
    """The replica's own load error out of Ray's deployment error, else Ray's first line."""
    from bnexport.serve.ray.replica import LOAD_FAILED

    for line in ray_error.splitlines():
        at = line.find(LOAD_FAILED)
        if at >= 0:
            return line[at:].strip()
    # else the replica's own traceback ends Ray's text: its last line is the exception
    return f"Ray Serve could not start the replicas: {_last_line(ray_error)}"


def _status_messages() -> str:
    """Ray Serve's status messages of the application and its deployments."""
    from ray import serve

    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # noqa: BLE001 - only for the error message
        return ""
    if app is None:
        return ""
    parts = [app.message, *(d.message for d in app.deployments.values())]
    return "\n".join(p for p in parts if p)


def _last_line(text: str) -> str:
    """The last non-empty line of a (Ray) error text: the original exception's message."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the processes started inside; restore them after."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def serve_replicas(
    path: str | os.PathLike,
    settings: ServeSettings,
    options: ReplicaOptions,
    *,
    print_fn: Callable[[str], None] = print,
) -> None:
    """Serve ``path`` as Ray Serve replicas until SIGINT/SIGTERM; then drain and stop.

    Args:
        path: an ``.onnx`` file or a model repository.
        settings: the server's settings.
        options: replicas, Ray address, GPUs, autoscaling.
        print_fn: where the banner goes.

    Raises:
        ReplicaStartError: the replicas did not start (one line).
        UsageError: bad options, or Ray is not installed.
    """
    from bnexport.serve.core.logs import configure_logging, get_logger

    bad = settings.problems() + options.problems()
    if settings.model_control != "none":
        bad.append(
            f"--model-control={settings.model_control} (not with --replicas: a load or "
            "unload would reach one replica)"
        )
    if bad:
        raise UsageError("invalid argument(s): " + ", ".join(bad))
    configure_logging(settings.log_level)
    if settings.log_level != "debug":  # Serve's own progress lines ("Deploying ...")
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    log = get_logger()
    server = RayServer(path, settings, options)
    stop = threading.Event()
    started = time.monotonic()
    server.start()  # ray.init installs its own SIGTERM handler: ours goes in after it
    previous = {
        sig: signal.signal(sig, lambda signum, frame: stop.set())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        names = server.model_names()
        where = f"{options.replicas} Ray Serve replica{'s' * (options.replicas != 1)}"
        print_fn(f"Serving {', '.join(names)} on {server.url} (KServe v2, {where})")
        if server.grpc_address:
            print_fn(f"gRPC (KServe v2 / Triton GRPCInferenceService) on {server.grpc_address}")
        auth = f' -H "Authorization: Bearer ${TOKEN_ENV}"' if settings.token else ""
        print_fn("Try:")
        print_fn(f"  curl -s{auth} {server.url}/v2/models/{names[0]}")
        log.info(
            "ready",
            extra={
                "fields": {
                    "replicas": options.replicas,
                    "seconds": round(time.monotonic() - started, 2),
                }
            },
        )
        stop.wait()
        log.info("draining")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("exited")
