"""What every endpoint of both transports shares: models, batchers, metrics, readiness.

One :class:`ServerState` per server (per Ray replica). The HTTP app builds it
(:func:`bnexport.serve.rest.app.create_app`, as ``app.state``); the gRPC servicer and the
data plane (:mod:`bnexport.serve.core.dataplane`) are handed the same object, so both
protocols merge their requests into the same batches and count them in the same metrics.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bnexport.serve.core.batcher import DynamicBatcher
from bnexport.serve.core.metrics import ServerMetrics
from bnexport.serve.core.repository import ModelRepository, ServedModel
from bnexport.serve.settings import BATCH_POLICIES, ServeSettings

#: models whose runs average less than this run on the event loop (no thread handoff)
INLINE_BELOW_S = 200e-6
_DEFAULTS = ServeSettings()


class ServerState:
    """Everything the endpoints share: models, batchers, metrics, readiness.

    Args:
        repository: the served models.
        metrics: the server's Prometheus metrics.
        instances: batches of one model that may run at the same time.
        batch_policy: ``"adaptive"`` or ``"window"`` (see :mod:`bnexport.serve.core.batcher`).
        decoder: the HTTP front end's JSON decode helper
            (:class:`~bnexport.serve.rest.decode_process.DecodeProcess`), closed on
            :meth:`drain`; ``None``: none.
    """

    def __init__(
        self,
        repository: ModelRepository,
        metrics: ServerMetrics,
        instances: int,
        batch_policy: str = _DEFAULTS.batch_policy,
        decoder: Any = None,
    ):
        if batch_policy not in BATCH_POLICIES:
            raise ValueError(
                f"batch_policy must be one of {BATCH_POLICIES}. Received: {batch_policy!r}"
            )
        self.repository = repository
        self.decoder = decoder
        self.batch_policy = batch_policy
        self.metrics = metrics
        self.instances = instances
        self.ready = True
        self.loop: asyncio.AbstractEventLoop | None = None
        self._batchers: dict[tuple[str, str], DynamicBatcher] = {}

    def batcher(self, model: ServedModel) -> DynamicBatcher:
        """The batcher of ``model``, created on first use in the running loop."""
        key = (model.name, model.version)
        batcher = self._batchers.get(key)
        if batcher is None:
            batcher = DynamicBatcher(
                model.run,
                max_batch=model.max_batch,
                timeout_s=model.batch_timeout_s,
                workers=self.instances,
                on_batch=self.metrics.batch_hook(*key),
                on_queue=self.metrics.queue_hook(*key),
                policy=self.batch_policy,
                inline_below_s=INLINE_BELOW_S,
                stats=model.stats,
            )
            self._batchers[key] = batcher
        return batcher

    def release(self, model: ServedModel) -> DynamicBatcher | None:
        """Forget the batcher of ``model`` (unloaded or replaced); the caller closes it."""
        return self._batchers.pop((model.name, model.version), None)

    def begin_drain(self) -> None:
        """Shutdown has begun: report not ready, run queued batches without waiting."""
        self.ready = False
        for batcher in self._batchers.values():
            batcher.flush()

    async def drain(self) -> None:
        """Stop being ready; run every queued request; stop the batchers and the decoder."""
        self.ready = False
        for batcher in list(self._batchers.values()):
            await batcher.close()
        if self.decoder is not None:
            await asyncio.to_thread(self.decoder.close)
