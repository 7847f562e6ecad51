"""Self-contained HTML parity report with a per-layer error plot.

The plot (matplotlib, Agg backend, no display needed) shows, per backend, the
max abs error of every compared layer in graph order on a log scale, with the
first layer out of tolerance marked; it is embedded as a base64 PNG so the file
can be mailed or attached to a CI run as is. Tables list every output, every
layer and the training-mode checks.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexport.parity.report_table import fmt

if TYPE_CHECKING:  # pragma: no cover
    from bnexport.parity.compare import Comparison
    from bnexport.parity.report import ParityReport

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:90%}
td:first-child,th:first-child{text-align:left}
.pass{color:#167a2c;font-weight:bold}.fail{color:#b3261e;font-weight:bold}
tr.first td{background:#fde8e6}
"""

_COLUMNS = (
    "name", "shape", "max abs", "max rel", "mean abs", "cosine", "p50", "p90", "p99", "p99.9",
    "top-1", "top-5", "NaN/Inf ref", "NaN/Inf out", "rtol", "atol", "status",
)  # fmt: skip


def plot_png(report: ParityReport) -> bytes | None:
    """PNG bytes of the per-layer error plot, or ``None`` when no layer was compared."""
    series = []
    for b in report.backends:
        pts = [(i, r) for i, r in enumerate(r for r in b.layers if r.comparison is not None)]
        if pts:
            series.append((b, pts))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n_layers = max(len(pts) for _, pts in series)
    fig = Figure(figsize=(min(max(8.0, 0.06 * n_layers + 6), 24), 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    floor = 1e-12
    for b, pts in series:
        xs = [i for i, _ in pts]
        ys = [max(r.comparison.max_absdiff, floor) for _, r in pts]
        ax.semilogy(xs, ys, marker=".", linewidth=1, label=f"{b.backend} max abs error")
        bad = [(i, max(r.comparison.max_absdiff, floor)) for i, r in pts if r.failed]
        if bad:
            ax.scatter(*zip(*bad, strict=True), color="red", zorder=3, s=18)
        first = b.first_failing_layer
        if first is not None:
            idx = next(i for i, r in pts if r is first)
            ax.axvline(idx, color="red", linestyle="--", linewidth=1)
            ax.annotate(
                f"first divergence: {first.layer}",
                (idx, max(first.comparison.max_absdiff, floor)),
                textcoords="offset points",
                xytext=(6, -14),
                color="red",
                fontsize=8,
            )
        labels = [r.layer for _, r in pts]
    step = max(1, len(labels) // 40)
    ax.set_xticks(range(0, len(labels), step))
    ax.set_xticklabels(labels[::step], rotation=90, fontsize=8 if len(labels) <= 40 else 6)
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("max |onnx - keras|")
    ax.set_title("per-layer error")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _row(c: Comparison, css_class: str = "") -> str:
    p = c.percentiles
    cells = [
        c.name,
        "x".join(map(str, c.shape)),
        fmt(c.max_absdiff),
        fmt(c.max_reldiff),
        fmt(c.mean_absdiff),
        fmt(c.cosine, ".6f"),
        *(fmt(p.get(k)) for k in ("p50", "p90", "p99", "p99.9")),
        "-" if c.top1 is None else f"{c.top1:.1%}",
        "-" if c.top5 is None else f"{c.top5:.1%}",
        f"{c.nonfinite_ref['nan']}/{c.nonfinite_ref['inf']}",
        f"{c.nonfinite_out['nan']}/{c.nonfinite_out['inf']}",
        fmt(c.rtol),
        fmt(c.atol),
    ]
    status = (
        '<span class="pass">PASS</span>'
        if c.passed
        else (f'<span class="fail" title="{html.escape(c.reason)}">FAIL</span>')
    )
    tds = "".join(f"<td>{html.escape(str(v))}</td>" for v in cells) + f"<td>{status}</td>"
    return f'<tr class="{css_class}">{tds}</tr>'


def _table(rows: list[str], first_col: str = "name") -> str:
    head = "".join(f"<th>{h}</th>" for h in (first_col, *_COLUMNS[1:]))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _int8_html(b: Any) -> str:
    """INT8 graph: the primary metric and the ranked layers (what to ``--exclude``)."""
    esc = html.escape
    top1 = b.top1
    metric = "no class-score output" if top1 is None else f"top-1 agreement {top1:.2%}"
    out = [f"<h3>INT8 (QDQ) graph</h3><p>Primary metric: <b>{metric}</b>.</p>"]
    if b.layer_losses:
        rows = "".join(
            f"<tr><td>{i}</td><td>{esc(x.layer)}</td><td>{x.nmse:.3e}</td>"
            f"<td>{x.added_nmse:.3e}</td><td><code>{esc(', '.join(x.nodes))}</code></td></tr>"
            for i, x in enumerate(b.layer_losses, 1)
        )
        out.append(
            "<table><tr><th>rank</th><th>layer</th><th>NMSE</th><th>added NMSE</th>"
            f"<th>ONNX nodes (quantize --exclude)</th></tr>{rows}</table>"
        )
        if b.exclude_candidates:
            names = esc(" ".join(b.exclude_candidates))
            out.append(
                f"<p>Keep in float32: <code>bnexport quantize ... --exclude {names}</code></p>"
            )
    return "".join(out)


def render_html(report: ParityReport) -> str:
    """The report as one HTML string (PNG plot inlined)."""
    esc = html.escape
    verdict = (
        '<span class="pass">PASS</span>' if report.passed else '<span class="fail">FAIL</span>'
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>bnexport parity report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Parity: {verdict}</h1>",
        f"<p>Keras model <code>{esc(report.model)}</code> vs ONNX <code>{esc(report.onnx)}</code>"
        f"; {report.samples} samples; inputs {esc(str(report.inputs))}; "
        f"{report.seconds:.1f} s.</p>",
    ]
    png = plot_png(report)
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            "<h2>Per-layer error</h2>"
            f'<img alt="per-layer error" src="data:image/png;base64,{data}">'
        )
    for b in report.backends:
        parts.append(f"<h2>{esc(b.backend)} ({esc(b.precision)})</h2>")
        if b.error:
            parts.append(f'<p class="fail">could not run: {esc(b.error)}</p>')
            continue
        parts.append("<h3>Outputs</h3>" + _table([_row(c) for c in b.outputs]))
        for c in b.outputs:
            if not c.passed:
                parts.append(f'<p class="fail">{esc(c.name)}: {esc(c.reason)}</p>')
        if b.quantized:
            parts.append(_int8_html(b))
        if b.layers:
            first = b.first_failing_layer
            note = (
                "all layers within tolerance"
                if first is None
                else (
                    f"first divergence at layer <b>{esc(first.layer)}</b> (tensor "
                    f"<code>{esc(first.tensor)}</code>)"
                )
            )
            parts.append(f"<h3>Layers ({esc(str(b.layer_map_source))} map)</h3><p>{note}</p>")
            rows = [
                _row(r.comparison, "first" if r is first else "")
                for r in b.layers
                if r.comparison is not None
            ]
            parts.append(_table(rows, "layer"))
            skipped = [r for r in b.layers if r.comparison is None]
            if skipped:
                items = "".join(
                    f"<li><code>{esc(r.layer)}</code>: {esc(r.skipped)}</li>" for r in skipped
                )
                parts.append(
                    f"<details><summary>{len(skipped)} layers skipped</summary>"
                    f"<ul>{items}</ul></details>"
                )
    if report.training is not None:
        parts.append("<h2>Training mode (Keras training=True vs FusedNorm batch_stats)</h2>")
        rows = []
        for t in report.training:
            if t.skipped:
                rows.append(
                    f"<tr><td>{esc(t.layer)}</td><td colspan=16>skipped: {esc(t.skipped)}</td></tr>"
                )
            for path, c in t.comparisons.items():
                rows.append(
                    _row(c).replace(
                        f"<td>{esc(c.name)}</td>",
                        f"<td>{esc(t.layer)} [{esc(path)}, ghost={t.virtual_batch_size}]</td>",
                        1,
                    )
                )
        parts.append(_table(rows, "layer [path]"))
        for t in report.training:
            if t.note:
                parts.append(f"<p><b>{esc(t.layer)}</b>: {esc(t.note)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: ParityReport, path: str | os.PathLike[str]) -> Path:
    """Write :func:`render_html` to ``path`` atomically; returns the path."""
    from bnexport.atomic_write import write_text_atomic

    write_text_atomic(path, render_html(report), make_parents=True)
    return Path(path)
