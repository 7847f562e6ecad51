"""Stage timing and op counting, shared by the exporter and the quantizer.

A pipeline runs named stages one after another. :class:`StageTimer` records the seconds
of each into one ``{stage: seconds}`` dict (what ``ExportReport.timings`` and
``QuantizeReport.timings`` hold, rounded to 0.1 ms) and, given a ``plan`` and a
``progress(step, done, total)`` callback, announces each planned stage as it starts:
``step`` is the stage's text, ``done`` how many planned stages are finished, ``total``
how many there are (known from the start, so a progress bar can be drawn).
:func:`op_counts` is the ``{op type: nodes}`` table both reports carry.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: ``progress(step, done, total)``: ``step`` runs now, ``done`` of ``total`` are finished
Progress = Callable[[str, int, "int | None"], None]


def _seconds(value: float) -> float:
    return round(value, 4)


class StageTimer:
    """Times consecutive stages into :attr:`timings`; announces planned ones to ``progress``.

    Args:
        plan: the stages in the order they run (only these are announced).
        progress: ``progress(step, done, total)`` before each planned stage, or ``None``.
        texts: ``{stage: what it does}`` for the progress callback (default: the name).
        timings: the dict to fill (default: a new one); a callee may fill its own keys
            (sub-stages) in the same dict.
    """

    def __init__(
        self,
        plan: Sequence[str] = (),
        *,
        progress: Progress | None = None,
        texts: Mapping[str, str] | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        self.plan = list(plan)
        self.timings: dict[str, float] = {} if timings is None else timings
        self._progress = progress
        self._texts = dict(texts or {})
        self._start = self._mark = time.perf_counter()

    def announce(self, stage: str) -> None:
        """Tell ``progress`` that ``stage`` (a planned stage) starts now."""
        if self._progress is not None and stage in self.plan:
            step = self._texts.get(stage, stage)
            self._progress(step, self.plan.index(stage), len(self.plan))

    def restart(self) -> None:
        """Start the clock of the next stage now (after work timed elsewhere)."""
        self._mark = time.perf_counter()

    def lap(self, stage: str, *, record: bool = True) -> None:
        """End ``stage``: record its seconds, announce the planned stage after it.

        ``record=False`` ends a stage whose parts a callee timed itself (their keys are
        already in :attr:`timings`).
        """
        now = time.perf_counter()
        if record:
            self.timings[stage] = _seconds(now - self._mark)
        self._mark = now
        if stage in self.plan[:-1]:
            self.announce(self.plan[self.plan.index(stage) + 1])

    def total(self) -> dict[str, float]:
        """Record ``"total"`` (seconds since the timer was made); return :attr:`timings`."""
        self.timings["total"] = _seconds(time.perf_counter() - self._start)
        return self.timings


def op_counts(model: Any) -> dict[str, int]:
    """``{op type: number of nodes}`` of an ``onnx.ModelProto``'s main graph."""
    return dict(collections.Counter(node.op_type for node in model.graph.node))
