"""Compare a candidate array (onnxruntime, TensorRT) with a reference (Keras).

Pass criterion (``check="elementwise"``, the default, ``np.allclose`` plus the range term
of :mod:`bnexport.tolerance`, ``max|ref|`` per output channel)::

    |out - ref| <= atol + rtol * |ref| + range_rtol * max|ref|      for every element

Other criteria apply the same inequality to one statistic of the error
(``"max"``: max abs error <= atol + (rtol + range_rtol) * max |ref|; ``"mean"``; ``"quantile"``:
the ``quantile``-th abs error; ``"agreement"``, for quantized graphs: top-1 agreement
>= ``min_top1`` on a class-score output whose reference predicts more than one class,
cosine >= ``min_cosine`` otherwise).
Non-finite values (NaN, +-Inf) on either side make the comparison fail and are
counted per side; every statistic is computed over the elements finite on both
sides, so a NaN is reported, never averaged.

Statistics (float64): max / mean abs error, max relative error
``|out - ref| / |ref|`` over the elements where ``ref != 0`` (ReLU outputs have
many exact zeros; their error is covered by the abs statistics),
cosine similarity of the flattened arrays, the normalized squared error
``NMSE = Σ(out − ref)² / Σ ref²``, and abs-error percentiles
(50, 90, 99, 99.9). For classifier outputs (rank 2, ``K > 1`` classes) also:
top-1 agreement = fraction of rows whose argmax agrees, and (``K > 5``) top-5
agreement = mean overlap ``|top5(ref) ∩ top5(out)| / 5``. Agreements are
reported, and are the pass criterion only with ``check="agreement"``.

Default tolerances and the criterion itself come from :mod:`bnexport.tolerance`, the one
policy shared with the exporter's verification (float32: ``rtol = atol = 1e-4``; float16:
``2e-2``; INT8 graphs are judged by top-1 agreement / cosine, see there).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from bnexport import tolerance as _tolerance

Check = Literal["elementwise", "max", "mean", "quantile", "agreement"]
CHECKS = ("elementwise", "max", "mean", "quantile", "agreement")

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
#: precision -> (rtol, atol), from :mod:`bnexport.tolerance`
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    name: (row.rtol, row.atol) for name, row in _tolerance.DEFAULTS.items()
}
default_tolerances = _tolerance.default_tolerances


def resolve_tolerance(
    value: float | Mapping[str, float] | None, name: str, default: float
) -> float:
    """A tolerance given as a float, a per-output dict (``""`` = every other output) or None."""
    if value is None:
        return default
    if isinstance(value, Mapping):
        if name in value:
            return float(value[name])
        return float(value.get("", default))
    return float(value)


@dataclasses.dataclass
class Comparison:
    """Result of comparing one tensor; truthy when it passes.

    Attributes:
        name: output (or layer) name.
        passed: whether the criterion holds and no value is non-finite.
        shape: compared shape (after any layout permutation).
        max_absdiff, mean_absdiff, max_reldiff: error statistics over finite elements.
        cosine: cosine similarity of the flattened arrays (1.0 = same direction).
        percentiles: ``{"p50": ..., "p90": ..., "p99": ..., "p99.9": ...}`` of abs error.
        top1, top5: classifier agreements or ``None``.
        nonfinite_ref, nonfinite_out: ``{"nan": n, "inf": n}`` per side.
        rtol, atol, check: the criterion applied (``range_rtol``: the range term).
        violations: number of elements violating the elementwise inequality.
        reason: one line saying why it failed ("" when it passed).
        nmse: ``Σ(out − ref)² / Σ ref²`` over finite elements (0 when both are 0).
        min_top1, min_cosine: the thresholds of ``check="agreement"`` (else ``None``).
        ref_absmax: ``max|ref|`` over finite elements (the report's tolerance line).
        criterion: what decided: ``check``, or for ``"agreement"`` either
            ``"top-1 agreement"`` or ``"cosine similarity"``.
    """

    name: str
    passed: bool
    shape: tuple[int, ...]
    max_absdiff: float
    mean_absdiff: float
    max_reldiff: float
    cosine: float
    percentiles: dict[str, float]
    top1: float | None
    top5: float | None
    nonfinite_ref: dict[str, int]
    nonfinite_out: dict[str, int]
    rtol: float
    atol: float
    check: str
    violations: int
    reason: str = ""
    nmse: float = 0.0
    min_top1: float | None = None
    min_cosine: float | None = None
    range_rtol: float = 0.0
    ref_absmax: float = 0.0
    criterion: str = ""

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite floats become the strings ``"inf"`` / ``"nan"``."""
        return _jsonable(dataclasses.asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        f = float(value)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(value, np.integer):
        return int(value)
    return value


def _nonfinite(a: np.ndarray) -> dict[str, int]:
    if a.dtype.kind not in "fc":
        return {"nan": 0, "inf": 0}
    return {"nan": int(np.isnan(a).sum()), "inf": int(np.isinf(a).sum())}


def _topk_agreement(ref: np.ndarray, out: np.ndarray) -> tuple[float | None, float | None]:
    if ref.ndim != 2 or ref.shape[1] < 2 or ref.shape[0] == 0:
        return None, None
    top1 = float(np.mean(np.argmax(ref, axis=1) == np.argmax(out, axis=1)))
    if ref.shape[1] <= 5:
        return top1, None
    r5 = np.argpartition(-ref, 5, axis=1)[:, :5]
    o5 = np.argpartition(-out, 5, axis=1)[:, :5]
    overlap = [len(set(a) & set(b)) / 5.0 for a, b in zip(r5, o5, strict=True)]
    return top1, float(np.mean(overlap))


def _informative_top1(ref: np.ndarray, out: np.ndarray) -> float | None:
    """Top-1 agreement, or ``None`` when it says nothing.

    ``None`` for outputs that are not class scores, and where the reference predicts the
    same class for every row (random-weight models often do).
    """
    top1, _ = _topk_agreement(ref, out)
    if top1 is None or np.unique(np.argmax(ref, axis=1)).size < 2:
        return None
    return top1


def _decided_by(check: str, ref: np.ndarray, out: np.ndarray) -> str:
    """The criterion that decides: ``check``, or which of top-1 / cosine for agreement."""
    if check != "agreement":
        return check
    return "cosine similarity" if _informative_top1(ref, out) is None else "top-1 agreement"


def compare_arrays(
    name: str,
    ref: Any,
    out: Any,
    *,
    rtol: float,
    atol: float,
    check: Check = "elementwise",
    quantile: float = 0.99,
    min_top1: float = _tolerance.INT8_MIN_TOP1,
    min_cosine: float = _tolerance.INT8_MIN_COSINE,
    range_rtol: float = 0.0,
) -> Comparison:
    """Compare ``out`` against the reference ``ref``.

    Args:
        name: what is compared (output or layer name), for the report.
        ref: reference array (Keras).
        out: candidate array, same shape.
        rtol: relative tolerance.
        atol: absolute tolerance.
        check: pass criterion (see the module docstring).
        quantile: quantile used by ``check="quantile"``.
        min_top1: top-1 agreement needed by ``check="agreement"`` (class scores).
        min_cosine: cosine similarity needed by ``check="agreement"`` (other outputs).
        range_rtol: tolerance relative to ``max|ref|`` of each element's output channel
            (:func:`bnexport.tolerance.channel_range`); 0: plain ``allclose``.

    Returns:
        A :class:`Comparison`; a shape mismatch fails with the reason stated.
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}. Received: check={check!r}")
    ref = np.asarray(ref)
    out = np.asarray(out)
    nan_ref, nan_out = _nonfinite(ref), _nonfinite(out)
    base = dict(
        name=name, rtol=float(rtol), atol=float(atol), check=check, range_rtol=float(range_rtol)
    )
    if check == "agreement":
        base.update(min_top1=float(min_top1), min_cosine=float(min_cosine))
    if ref.shape != out.shape:
        return Comparison(
            **base,
            passed=False,
            shape=tuple(ref.shape),
            max_absdiff=math.inf,
            mean_absdiff=math.inf,
            max_reldiff=math.inf,
            cosine=math.nan,
            percentiles={},
            top1=None,
            top5=None,
            nonfinite_ref=nan_ref,
            nonfinite_out=nan_out,
            violations=-1,
            reason=f"shape mismatch: reference {tuple(ref.shape)}, candidate {tuple(out.shape)}",
        )
    # float32 work arrays for 16/32-bit data (sums accumulate in float64), float64 otherwise
    work = (
        np.float64 if np.float64 in (ref.dtype, out.dtype) or ref.dtype.kind != "f" else np.float32
    )
    r = np.asarray(ref, dtype=work).ravel()
    o = np.asarray(out, dtype=work).ravel()
    # max|ref| of each element's channel (the range term), flattened like r
    span = np.broadcast_to(_tolerance.channel_range(ref), ref.shape).ravel() if range_rtol else 0.0
    if nan_ref["nan"] + nan_ref["inf"] + nan_out["nan"] + nan_out["inf"]:
        finite = np.isfinite(r) & np.isfinite(o)
        rf, of = r[finite], o[finite]
        if range_rtol:
            span = span[finite]
    else:
        rf, of = r, o
    absdiff = np.abs(of - rf)
    absref = np.abs(rf)
    if absdiff.size:
        nz = absref > 0
        rel = np.divide(absdiff, absref, out=np.zeros_like(absdiff), where=nz)
        max_rel = float(rel.max())
        max_abs, mean_abs = float(absdiff.max()), float(absdiff.mean(dtype=np.float64))
        pct_values = np.percentile(absdiff, PERCENTILES)
        pct = {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, pct_values, strict=True)}
        nr = math.sqrt(float(np.sum(np.square(rf), dtype=np.float64)))
        no = math.sqrt(float(np.sum(np.square(of), dtype=np.float64)))
        if nr == 0.0 and no == 0.0:
            cosine = 1.0
        elif nr == 0.0 or no == 0.0:
            cosine = 0.0
        else:
            dot = float(np.sum(rf * of, dtype=np.float64))
            cosine = min(1.0, max(-1.0, dot / (nr * no)))
        err2 = float(np.sum(np.square(absdiff), dtype=np.float64))
        nmse = err2 / (nr * nr) if nr > 0.0 else (0.0 if err2 == 0.0 else math.inf)
    else:
        max_abs = mean_abs = max_rel = 0.0
        pct, cosine, nmse = {f"p{p:g}": 0.0 for p in PERCENTILES}, 1.0, 0.0
    # rf/of are finite here (non-finite elements are counted apart and fail below)
    violations = int(
        np.count_nonzero(_tolerance.exceeds(absdiff, absref, rtol, atol, range_rtol, span))
    )
    top = float(absref.max()) if absref.size else 0.0
    if check == "elementwise":
        ok = violations == 0
    elif check == "max":
        ok = max_abs <= atol + (rtol + range_rtol) * top
    elif check == "agreement":
        top1_now = _informative_top1(ref, out)
        ok = (top1_now >= min_top1) if top1_now is not None else cosine >= min_cosine
    elif check == "mean":
        ref_mean = float(absref.mean()) if absref.size else 0.0
        ok = mean_abs <= atol + rtol * ref_mean + range_rtol * top
    else:
        q = float(np.quantile(absdiff, quantile)) if absdiff.size else 0.0
        ref_q = float(np.quantile(absref, quantile)) if absref.size else 0.0
        ok = q <= atol + rtol * ref_q + range_rtol * top
    reason = ""
    n_bad = sum(nan_ref.values()) + sum(nan_out.values())
    if n_bad:
        ok = False
        reason = (
            f"non-finite values: reference {nan_ref['nan']} NaN / {nan_ref['inf']} Inf, "
            f"candidate {nan_out['nan']} NaN / {nan_out['inf']} Inf"
        )
    elif not ok and check == "agreement":
        top1_now = _informative_top1(ref, out)
        reason = (
            f"top-1 agreement {top1_now:.2%} < {min_top1:.2%}"
            if top1_now is not None
            else f"cosine similarity {cosine:.5f} < {min_cosine}"
            + (" (the reference predicts one class for every row)" if ref.ndim == 2 else "")
        )
    elif not ok:
        reason = (
            f"{violations} of {absdiff.size} elements exceed atol + rtol*|ref| + "
            "range_rtol*max|ref| "
            f"(max abs {max_abs:.3g}, max rel {max_rel:.3g}; check={check})"
        )
    top1, top5 = _topk_agreement(ref, out) if not n_bad else (None, None)
    return Comparison(
        **base,
        passed=bool(ok),
        shape=tuple(int(d) for d in ref.shape),
        max_absdiff=max_abs,
        mean_absdiff=mean_abs,
        max_reldiff=max_rel,
        cosine=cosine,
        percentiles=pct,
        top1=top1,
        top5=top5,
        nonfinite_ref=nan_ref,
        nonfinite_out=nan_out,
        violations=violations,
        reason=reason,
        nmse=nmse,
        ref_absmax=float(absref.max()) if absref.size else 0.0,
        criterion=_decided_by(check, ref, out),
    )
