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
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from bnexport.serve.core.model_control import load_model, unload_model
from bnexport.serve.core.statistics import statistics_response
from bnexport.serve.protocol.errors import BadRequestError
from bnexport.serve.protocol.types import ErrorResponse

if TYPE_CHECKING:
    from bnexport.serve.rest.app import ServerState

_ERRORS: dict = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 503)}
#: Triton extensions both protocols announce in their server metadata
EXTENSIONS = ["model_configuration", "model_repository", "statistics"]


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


def triton_router(state: ServerState) -> APIRouter:
    """Router of the statistics and repository endpoints of ``state``'s repository.

    Include it before the model-metadata routes: ``/v2/models/stats`` would
    otherwise be read as the metadata of a model named ``stats``.
    """
    router = APIRouter()
    repository = state.repository

    @router.get("/v2/models/stats", responses=_ERRORS)
    @router.get("/v2/models/{name}/stats", responses=_ERRORS)
    @router.get("/v2/models/{name}/versions/{version}/stats", responses=_ERRORS)
    async def model_stats(name: str | None = None, version: str | None = None) -> dict:
        return statistics_response(repository, name, version)

    @router.post("/v2/repository/index", responses=_ERRORS)
    async def repository_index(request: Request) -> JSONResponse:
        body = await _json_object(request, "repository index")
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise BadRequestError("repository index: 'ready' must be a boolean")
        rows = repository.index()
        if ready:
            rows = [r for r in rows if r["state"] == "READY"]
        return JSONResponse(rows)

    @router.post("/v2/repository/models/{name}/load", responses=_ERRORS)
    async def repository_load(name: str, request: Request) -> JSONResponse:
        params = (await _json_object(request, f"load '{name}'")).get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequestError(f"load '{name}': 'parameters' must be an object")
        await load_model(state, name, params)
        return JSONResponse({})

    @router.post("/v2/repository/models/{name}/unload", responses=_ERRORS)
    async def repository_unload(name: str, request: Request) -> JSONResponse:
        await _json_object(request, f"unload '{name}'")
        await unload_model(state, name)
        return JSONResponse({})

    return router
