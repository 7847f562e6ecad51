"""Explicit model control: load (or reload) and unload a model while the server runs.

Triton's ``--model-control-mode``, in two of its modes:

- ``none`` (the default): the models found at start are served until the server
  stops; load/unload requests are refused (FAILED_PRECONDITION / HTTP 409).
- ``explicit``: every model is loaded at start (like Triton's ``--load-model=*``),
  and ``POST /v2/repository/models/{name}/load`` (gRPC RepositoryModelLoad) reads
  the model folder again and serves the new versions; ``.../unload`` stops
  serving it. ``POST /v2/repository/index`` lists the models of the repository
  with their state (``READY`` or ``UNAVAILABLE``/``unloaded``).

A load is safe under traffic::

    new = read_model(name)          # sessions built and warmed up in a worker thread
    old = repository.swap(name, new)  # on the event loop: later requests get `new`
    state.release(old) -> batchers    # forgotten, so `new` gets fresh batchers
    await batcher.close()             # requests already on `old` finish on it

Requests look a model up, get its batcher and announce themselves
(``expect()``) without awaiting in between, so each one is either served by the
old version to the end or by the new one; none is refused by the swap. If the
new versions fail to load, the old ones keep serving and the error names the
file. Loads and unloads are serialized (one at a time per server).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from bnexport.errors import BnexportError
from bnexport.serve.core.logs import get_logger
from bnexport.serve.protocol.errors import BadRequestError, ModelNotFoundError, ServeError

if TYPE_CHECKING:
    from bnexport.serve.core.repository import ServedModel
    from bnexport.serve.core.state import ServerState

MODES = ("none", "explicit")


class ModelControlError(ServeError):
    """Load/unload asked of a server not started with ``--model-control explicit`` (409)."""

    status_code = 409


class ModelLoadError(ServeError):
    """The model's files or config could not be loaded; the old version keeps serving (400)."""

    status_code = 400


def _check_mode(state: ServerState, action: str, name: str) -> None:
    mode = state.repository.control_mode
    if mode != "explicit":
        raise ModelControlError(
            f"cannot {action} model '{name}': model control is '{mode}'; start the server "
            "with --model-control explicit"
        )


async def load_model(
    state: ServerState, name: str, parameters: Mapping[str, Any] | None = None
) -> None:
    """Read model ``name`` from the repository again and serve it (new or replaced).

    Returns once the new versions serve and the requests in flight on the old
    ones have finished.

    Args:
        state: the server's shared state.
        name: the model folder's name.
        parameters: the load request's parameters; Triton's ``config`` and
            ``file:<path>`` overrides are refused (the model is read as it is on disk).

    Raises:
        ModelControlError: model control is not ``explicit``.
        ModelNotFoundError: the repository holds no model ``name``.
        ModelLoadError: its config or model files are invalid.
        BadRequestError: an override parameter was given.
    """
    _check_mode(state, "load", name)
    overrides = [k for k in parameters or {} if k == "config" or k.startswith("file:")]
    if overrides:
        raise BadRequestError(
            f"load '{name}': the {overrides} override(s) are not supported; "
            "change the model folder and load again"
        )
    log = get_logger()
    async with state.repository.control_lock:
        try:
            models = await asyncio.to_thread(state.repository.read_model, name)
        except ServeError:
            raise
        except (BnexportError, OSError, ValueError) as exc:
            raise ModelLoadError(f"model '{name}' failed to load: {exc}") from None
        old = state.repository.swap(name, models)
        batchers = _release(state, old.values())
        log.info(
            "model loaded",
            extra={"fields": {"model": name, "versions": list(models), "replaced": list(old)}},
        )
        await _close(batchers)


async def unload_model(state: ServerState, name: str) -> None:
    """Stop serving model ``name``; returns once its requests in flight have finished.

    Raises:
        ModelControlError: model control is not ``explicit``.
        ModelNotFoundError: no model ``name`` is loaded.
    """
    _check_mode(state, "unload", name)
    async with state.repository.control_lock:
        old = state.repository.swap(name, None)
        if not old:
            raise ModelNotFoundError(
                f"model '{name}' is not loaded; loaded: {state.repository.names()}"
            )
        batchers = _release(state, old.values())
        get_logger().info(
            "model unloaded", extra={"fields": {"model": name, "versions": list(old)}}
        )
        await _close(batchers)


def _release(state: ServerState, models: Iterable[ServedModel]) -> list[Any]:
    """Forget the batchers of ``models`` (synchronously, right after the swap)."""
    batchers = (state.release(model) for model in models)
    return [b for b in batchers if b is not None]


async def _close(batchers: list[Any]) -> None:
    """Let the requests on the retired batchers finish, then stop their workers."""
    if batchers:
        await asyncio.gather(*(b.close() for b in batchers))
