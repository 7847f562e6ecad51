"""HTTP endpoints of Triton's statistics and model-repository extensions.

Endpoints (as Triton serves them, so ``tritonclient.http`` works unmodified)::

    GET  /v2/models/stats                                   statistics of every model
    GET  /v2/models/{name}[/versions/{version}]/stats       statistics of one model (version)
    POST /v2/repository/index                               models of the repository and state
    POST /v2/repository/models/{name}/load                  (re)load a model   (explicit mode)
    POST /v2/repository/models/{name}/unload                unload a model     (explicit mode)

Statistics bodies are Triton's ``{"model_stats": [...]}`` (see
:mod:`bnexport.serve.core.statistics`); the index is a list of ``{"name", "version",
"state", "reason"}``; a load body may be empty or ``{"parameters": {...}}``
(Triton's ``config`` / ``file:`` overrides are refused: the model is read from
the repository folder as it is on disk). Load and unload answer 409 unless the
server runs with ``--model-control explicit`` (see
:mod:`bnexport.serve.core.model_control`).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from bnexport.serve.core.dataplane import EXTENSIONS, DataPlane
from bnexport.serve.protocol.errors import BadRequestError
from bnexport.serve.rest.responses import ERRORS

__all__ = ["EXTENSIONS", "triton_router"]


async def _json_object(request: Request, what: str) -> dict[str, Any]:
    """The request body as a JSON object; ``{}`` for an empty body."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise BadRequestError(f"{what}: body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequestError(f"{what}: body must be a JSON object")
    return value


def triton_router(dataplane: DataPlane) -> APIRouter:
    """Router of the statistics and repository endpoints of the data plane's repository.

    Include it before the model-metadata routes: ``/v2/models/stats`` would
    otherwise be read as the metadata of a model named ``stats``.
    """
    router = APIRouter()

    @router.get("/v2/models/stats", responses=ERRORS)
    @router.get("/v2/models/{name}/stats", responses=ERRORS)
    @router.get("/v2/models/{name}/versions/{version}/stats", responses=ERRORS)
    async def model_stats(name: str | None = None, version: str | None = None) -> dict:
        return dataplane.statistics(name, version)

    @router.post("/v2/repository/index", responses=ERRORS)
    async def repository_index(request: Request) -> JSONResponse:
        body = await _json_object(request, "repository index")
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise BadRequestError("repository index: 'ready' must be a boolean")
        return JSONResponse(dataplane.repository_index(ready))

    @router.post("/v2/repository/models/{name}/load", responses=ERRORS)
    async def repository_load(name: str, request: Request) -> JSONResponse:
        params = (await _json_object(request, f"load '{name}'")).get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequestError(f"load '{name}': 'parameters' must be an object")
        await dataplane.load(name, params)
        return JSONResponse({})

    @router.post("/v2/repository/models/{name}/unload", responses=ERRORS)
    async def repository_unload(name: str, request: Request) -> JSONResponse:
        await _json_object(request, f"unload '{name}'")
        await dataplane.unload(name)
        return JSONResponse({})

    return router
