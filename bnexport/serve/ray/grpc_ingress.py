"""The KServe v2 gRPC service as Ray Serve's gRPC proxy sees it: raw bytes in, raw bytes out.

Ray's gRPC proxy imports an ``add_..._to_server(servicer, server)`` function by
path (``gRPCOptions.grpc_servicer_functions``), keeps each method's request
deserializer, and pickles the request message to send it to a replica.
tritonclient's generated message classes report the module ``grpc_service_pb2``
(the name of the ``.proto`` they were compiled from), which does not exist under
that name, so a replica cannot unpickle them. :func:`add_inference_service`
registers the same service and methods with no deserializer: the proxy forwards
the request bytes untouched, and the replica parses them with tritonclient's
classes (:func:`parse_request`). No message class is pickled, and the proxy does
not parse what the replica parses again.

The unary RPCs of :mod:`bnexport.serve.grpc.service` are served; the bidirectional
``ModelStreamInfer`` is not registered (a client gets UNIMPLEMENTED).
"""

from __future__ import annotations

from typing import Any

#: the service tritonclient.grpc calls
SERVICE = "inference.GRPCInferenceService"

#: RPCs served through Ray's proxy (request ``<RPC>Request``, response ``<RPC>Response``)
UNARY_RPCS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelInfer",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
)


def _unused(request: bytes, context: Any) -> bytes:  # pragma: no cover - Ray replaces it
    raise NotImplementedError("Ray Serve's gRPC proxy routes this method to a replica")


def add_inference_service(servicer: Any, server: Any) -> None:
    """Register ``inference.GRPCInferenceService`` on ``server`` with raw-bytes methods.

    Called by Ray Serve's gRPC proxy (named in ``gRPCOptions.grpc_servicer_functions``);
    the proxy replaces each behaviour with its own routing to the replicas.

    Args:
        servicer: ignored (Ray passes a placeholder).
        server: the proxy's gRPC server.
    """
    import grpc
    from tritonclient.grpc import service_pb2  # noqa: F401 - the descriptors, for reflection

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _unused, request_deserializer=None, response_serializer=None
        )
        for name in UNARY_RPCS
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


def parse_request(rpc: str, data: bytes) -> Any:
    """The request message of ``rpc`` parsed from the bytes the proxy forwarded."""
    from tritonclient.grpc import service_pb2

    return getattr(service_pb2, f"{rpc}Request").FromString(data)


def empty_response(rpc: str) -> Any:
    """An empty response message of ``rpc`` (sent with an error status, never read)."""
    from tritonclient.grpc import service_pb2

    return getattr(service_pb2, f"{rpc}Response")()
