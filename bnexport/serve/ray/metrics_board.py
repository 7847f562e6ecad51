"""One ``/metrics`` for all replicas: every sample labelled with the replica it came from.

Behind Ray's HTTP proxy, ``GET /metrics`` reaches whichever replica the proxy picks,
and each replica counts only its own requests. So each replica posts its metrics
text to a small actor, the board (created by the driver, named
:data:`BOARD_NAME`), every :data:`PUSH_PERIOD_S`, and reads back the others'. Its
``/metrics`` then answers with every replica's samples, each with a
``replica="<Ray replica id>"`` label: one scrape gives the per-replica series and
``sum without (replica) (...)`` gives the aggregate. Its own samples are current;
the others' are at most about two push periods old. A replica that stops removes
its entry; one that dies is dropped after :data:`STALE_S`.

Ray's own metrics (``ray_serve_*``: requests, errors and latency per replica as the
proxy sees them) are exported separately by each node's Ray metrics agent.

:func:`merge` and :class:`MetricsBoard` need no Ray; :class:`ReplicaMetrics` talks
to the board through Ray inside a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from bnexport.serve.core.metrics import ServerMetrics

#: name of the board actor (in the Serve namespace)
BOARD_NAME = "bnexport_metrics_board"
#: how often a replica posts its metrics and reads the others'
PUSH_PERIOD_S = 1.0
#: entries older than this are dropped (a replica that died without removing its own)
STALE_S = 15.0


def merge(texts: Mapping[str, str]) -> bytes:
    """Prometheus text of several replicas as one exposition, ``replica`` label added.

    Args:
        texts: replica id -> that replica's text exposition.

    Returns:
        One text exposition with each metric family once, holding every replica's samples
        (``*_created`` series, the creation time of each replica's counters, are left out).
    """
    families: dict[tuple[str, str], Metric] = {}
    for replica in sorted(texts):
        for family in text_string_to_metric_families(texts[replica]):
            if family.name.endswith("_created"):
                continue  # creation times of each replica's series: nothing to add up
            key = (family.name, family.type)
            merged = families.get(key)
            if merged is None:
                merged = families[key] = Metric(family.name, family.documentation, family.type)
            for s in family.samples:
                merged.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp)

    class _Fixed:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed())  # type: ignore[arg-type]
    return generate_latest(registry)


class MetricsBoard:
    """The latest metrics text of each replica (run as a Ray actor by the driver)."""

    def __init__(self) -> None:
        self._texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        """Record ``replica``'s current metrics text."""
        self._texts[replica] = (time.monotonic(), text)

    def remove(self, replica: str) -> None:
        """Forget ``replica`` (it is stopping)."""
        self._texts.pop(replica, None)

    def texts(self) -> dict[str, str]:
        """Every live replica's latest text."""
        now = time.monotonic()
        self._texts = {r: v for r, v in self._texts.items() if now - v[0] < STALE_S}
        return {r: text for r, (_, text) in self._texts.items()}


class ReplicaMetrics(ServerMetrics):
    """A replica's metrics; :meth:`render` answers with every replica's samples.

    Args:
        replica: this replica's id (the ``replica`` label of its samples).
    """

    def __init__(self, replica: str) -> None:
        super().__init__()
        self.replica = replica
        self._others: dict[str, str] = {}
        self._board: Any = None

    def own_text(self) -> str:
        """This replica's metrics, without the ``replica`` label."""
        return generate_latest(self.registry).decode()

    def render(self) -> bytes:
        """Every replica's samples, labelled (the others' as last read from the board)."""
        return merge({**self._others, self.replica: self.own_text()})

    async def sync_forever(self, board: Any) -> None:
        """Post this replica's text and read the others', every :data:`PUSH_PERIOD_S`."""
        self._board = board
        while True:
            with contextlib.suppress(Exception):  # the board is best effort
                await board.put.remote(self.replica, self.own_text())
                texts = await board.texts.remote()
                self._others = {r: t for r, t in texts.items() if r != self.replica}
            await asyncio.sleep(PUSH_PERIOD_S)

    async def leave(self) -> None:
        """Remove this replica from the board (it is stopping)."""
        if self._board is not None:
            with contextlib.suppress(Exception):
                await self._board.remove.remote(self.replica)
