"""The per-layer error plot of the HTML parity report (matplotlib, Agg backend).

One point per compared layer in graph order, per backend: the layer's max abs error
``max|onnx − keras|`` on a log scale. Beside it the layer's tolerance: the error every
element may have whatever its value (``atol``, the bottom of the shaded band) and the
error the element with the largest ``|ref|`` may have (``atol + (rtol + range_rtol) ·
max|ref|``, the dashed line at the top of the band). A point above the line is out of
tolerance, one below the band within it; inside the band it depends on which elements
erred (the table's status says). Failing layers are red and the first one is marked
"first divergence".

Every layer keeps its label: long graphs are cut into stacked panels of at most
:data:`MAX_LAYERS_PER_PANEL` layers that share the y axis, so the labels stay at a
readable size and the figure fits a 1280 px window without a horizontal scrollbar.
Labels longer than :data:`MAX_LABEL_CHARS` are shortened in the middle (``block_1…_BN``);
the tables below the plot carry the full names.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from bnexport.parity.report import BackendResult, LayerResult, ParityReport

#: layers per panel: at the figure's width, 15 px per rotated 7-pt label
MAX_LAYERS_PER_PANEL = 70
#: longer layer names are shortened in the middle on the axis
MAX_LABEL_CHARS = 30
#: figure width in inches at :data:`DPI` (shown at ``WIDTH_PX`` CSS pixels)
FIGURE_WIDTH_IN = 12.0
DPI = 150
WIDTH_PX = 1200
_FLOOR = 1e-12  # zero errors are drawn here (a log axis has no 0)
_BAND_CHECKS = ("elementwise", "max")  # checks whose bound the band shows


def short_label(name: str, limit: int = MAX_LABEL_CHARS) -> str:
    """``name`` shortened in the middle to ``limit`` characters (``…`` marks the cut)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[len(name) - (limit - 1 - head) :]


def tolerance_bounds(comparison: Any) -> tuple[float, float] | None:
    """``(atol, atol + (rtol + range_rtol)·max|ref|)`` of a comparison, or ``None``.

    ``None`` for criteria that are not a bound on the error (INT8 agreement, mean,
    quantile): those have no line.
    """
    if comparison.check not in _BAND_CHECKS:
        return None
    low = comparison.atol
    high = low + (comparison.rtol + getattr(comparison, "range_rtol", 0.0)) * (
        comparison.ref_absmax
    )
    return low, high


def panels(n_layers: int, per_panel: int = MAX_LAYERS_PER_PANEL) -> list[range]:
    """Split ``range(n_layers)`` into equal consecutive panels of at most ``per_panel``."""
    if n_layers <= 0:
        return []
    count = math.ceil(n_layers / per_panel)
    size = math.ceil(n_layers / count)
    return [range(i, min(i + size, n_layers)) for i in range(0, n_layers, size)]


def _series(report: ParityReport) -> list[tuple[BackendResult, list[LayerResult]]]:
    out = []
    for b in report.backends:
        compared = [r for r in b.layers if r.comparison is not None]
        if compared:
            out.append((b, compared))
    return out


def plot_png(report: ParityReport) -> bytes | None:
    """PNG bytes of the per-layer error plot, or ``None`` when no layer was compared."""
    fig = build_figure(report)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def build_figure(report: ParityReport) -> Any:
    """The per-layer error plot as a matplotlib ``Figure`` (``None``: no layer compared).

    One axes per panel (:func:`panels`), top to bottom; every compared layer is a tick
    labelled with its :func:`short_label`.
    """
    series = _series(report)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    labels = [r.layer for r in max((s for _, s in series), key=len)]
    parts = panels(len(labels))
    values = [
        v
        for _, layers in series
        for r in layers
        for v in (r.comparison.max_absdiff, *(tolerance_bounds(r.comparison) or ()))
        if math.isfinite(v)
    ]
    top = max([_FLOOR, *values]) * 30  # headroom for the legend and the annotation
    bottom = min([v for v in values if v > 0] or [_FLOOR])
    bottom = _FLOOR if any(v == 0 for v in values) else bottom
    longest = max(len(short_label(n)) for n in labels)
    label_in = 0.3 + 0.055 * longest  # rotated 7-pt labels below the axis
    panel_in = 2.4 + label_in
    fig = Figure(figsize=(FIGURE_WIDTH_IN, 0.5 + panel_in * len(parts)), dpi=DPI)
    axes = fig.subplots(len(parts), 1, squeeze=False)[:, 0]
    colors = [f"C{i}" for i in range(10)]
    for ax, part in zip(axes, parts, strict=True):
        for k, (b, layers) in enumerate(series):
            _draw_backend(ax, b, layers, part, colors[k % len(colors)], legend=ax is axes[0])
        ax.set_yscale("log")
        ax.set_ylim(bottom / 3, top)
        ax.set_xlim(part.start - 0.6, part.stop - 0.4)
        ax.set_xticks(list(part))
        ax.set_xticklabels([short_label(labels[i]) for i in part], rotation=90, fontsize=7)
        ax.set_ylabel("max |onnx − keras|", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_title(
        f"per-layer error ({len(labels)} layers, graph order"
        + (f", {len(parts)} panels)" if len(parts) > 1 else ")"),
        fontsize=10,
    )
    axes[0].legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    return fig


def _draw_backend(
    ax: Any, b: BackendResult, layers: list[LayerResult], part: range, color: str, legend: bool
) -> None:
    """One backend's points, tolerance band and first divergence inside ``part``."""
    idx = [i for i in part if i < len(layers)]
    if not idx:
        return
    ys = [max(layers[i].comparison.max_absdiff, _FLOOR) for i in idx]
    ax.plot(idx, ys, marker=".", linewidth=1, color=color, label=f"{b.backend} max abs error")
    bounds = [(i, tolerance_bounds(layers[i].comparison)) for i in idx]
    bounds = [(i, bd) for i, bd in bounds if bd is not None]
    if bounds:
        xs = [i for i, _ in bounds]
        low = [max(bd[0], _FLOOR) for _, bd in bounds]
        high = [max(bd[1], _FLOOR) for _, bd in bounds]
        ax.fill_between(xs, low, high, step="mid", color=color, alpha=0.08, linewidth=0)
        ax.step(
            xs,
            high,
            where="mid",
            color=color,
            linestyle="--",
            linewidth=1,
            label=f"{b.backend} tolerance: atol (band) to atol + rtol·max|ref| (line)"
            if legend
            else None,
        )
    bad = [(i, max(layers[i].comparison.max_absdiff, _FLOOR)) for i in idx if layers[i].failed]
    if bad:
        ax.scatter(*zip(*bad, strict=True), color="red", zorder=3, s=18)
    first = b.first_failing_layer
    at = next((i for i in idx if layers[i] is first), None)
    if first is not None and at is not None:
        ax.axvline(at, color="red", linestyle=":", linewidth=1)
        ax.annotate(
            f"first divergence: {first.layer}",
            (at, max(first.comparison.max_absdiff, _FLOOR)),
            textcoords="offset points",
            xytext=(6, 6),
            color="red",
            fontsize=8,
        )
