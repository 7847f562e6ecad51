"""Per-node INT8 sensitivity and the auto-exclude search.

Sensitivity of a quantizable node ``n`` (the layer-wise analysis of Wu et al., "Integer
Quantization for Deep Learning Inference", 2020): quantize **only** ``n``, run the graph on
the evaluation batches and measure the output NMSE against the float32 graph,

    s(n) = mean over outputs o of Σ(o_n − o_fp32)² / Σ o_fp32².

It isolates the error a node's own input/weight/output quantization adds, which a
per-tensor comparison inside the fully quantized graph cannot (errors accumulate
downstream). Each try reuses the calibration cache, so it costs one graph rewrite and one
evaluation, not a calibration.

Auto-exclude: for ``k = 0, 1, 2, ...`` keep the ``k`` most sensitive nodes in float32 and
quantize the rest, until the top-1 agreement with the float32 graph reaches the target or
``k`` reaches ``max_exclude``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bnexport.errors import QuantizeError
from bnexport.quantize.compare import OutputMetrics, mean_nmse, primary_agreement
from bnexport.quantize.report import SearchStep

#: quantize with these nodes excluded -> (model, per-output metrics)
QuantizeFn = Callable[[Sequence[str]], tuple[Any, list[OutputMetrics]]]
#: quantize only this node -> per-output metrics
SingleFn = Callable[[str], list[OutputMetrics]]


def rank_nodes(candidates: Sequence[str], measure_single: SingleFn) -> dict[str, float]:
    """``{node: s(node)}`` for every candidate, most sensitive first."""
    scores = {node: mean_nmse(measure_single(node)) for node in candidates}
    return dict(sorted(scores.items(), key=lambda item: -item[1]))


def search_exclusions(
    quantize_excluding: QuantizeFn,
    ranking: Sequence[str],
    *,
    base_exclude: Sequence[str],
    target: float,
    max_exclude: int,
    keep_best: bool = False,
) -> tuple[Any, list[OutputMetrics], list[str], list[SearchStep]]:
    """Exclude the most sensitive nodes one by one until the agreement reaches ``target``.

    Returns:
        ``(model, metrics, auto_excluded, steps)`` of the first try that meets ``target``;
        with ``keep_best``, of the best try when none does (the caller reports it).

    Raises:
        QuantizeError: the graph has no class-score output (no top-1 agreement to
            target), or ``max_exclude`` exclusions do not reach ``target`` (the message
            lists the agreement of every try).
    """
    steps: list[SearchStep] = []
    best: tuple[Any, list[OutputMetrics], list[str]] | None = None
    for k in range(0, min(max_exclude, len(ranking)) + 1):
        chosen = list(ranking[:k])
        model, metrics = quantize_excluding([*base_exclude, *chosen])
        agreement = primary_agreement(metrics)
        if agreement is None:
            raise QuantizeError(
                "target_agreement needs a class-score output (rank >= 2, last dimension >= 2) "
                "to measure top-1 agreement; this graph has none"
            )
        steps.append(SearchStep(k, chosen, agreement, mean_nmse(metrics)))
        if agreement >= target:
            return model, metrics, chosen, steps
        if best is None or agreement > max(s.top1_agreement or 0.0 for s in steps[:-1]):
            best = (model, metrics, chosen)
    if keep_best and best is not None:
        return (*best, steps)
    tries = ", ".join(f"k={s.k}: {s.top1_agreement:.2%}" for s in steps)
    raise QuantizeError(
        f"top-1 agreement {target:.2%} not reached with up to {steps[-1].k} node(s) kept in "
        f"float32 ({tries}); raise max_exclude, try method='entropy' or 'percentile', or "
        "give more calibration data"
    )
