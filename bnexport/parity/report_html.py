"""Self-contained HTML parity report with a per-layer error plot.

The plot (:mod:`bnexport.parity.report_plot`: per-layer max abs error on a log scale
with each layer's tolerance, first divergence marked) is embedded as a base64 PNG so
the file can be mailed or attached to a CI run as is. Tables list every output, every
layer and the training-mode checks; they fit a 1280 px window: numbers never wrap
(``white-space: nowrap``), long layer names wrap inside a bounded first column, and
columns with nothing to say (top-1/top-5 of spatial tensors, an unused range term) are
left out. An INT8 graph's section names the criterion that decided each output (top-1
agreement, or cosine similarity where the reference predicts one class) and its value.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexport.parity.report_plot import WIDTH_PX, plot_png
from bnexport.parity.report_table import fmt

if TYPE_CHECKING:  # pragma: no cover
    from bnexport.parity.compare import Comparison
    from bnexport.parity.report import BackendResult, ParityReport

__all__ = ["plot_png", "render_html", "write_html"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:1em 1.5em;color:#222}
table.cmp{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}
table.cmp td,table.cmp th{border:1px solid #ccc;padding:2px 5px;text-align:right}
table.cmp th{white-space:normal;vertical-align:bottom}
td.num{white-space:nowrap;font-variant-numeric:tabular-nums}
table.cmp td.name,table.cmp th.name{text-align:left;max-width:18em;overflow-wrap:anywhere}
.pass{color:#167a2c;font-weight:bold}.fail{color:#b3261e;font-weight:bold}
tr.first td{background:#fde8e6}
.warn{color:#8a5300}
img.plot{max-width:100%;height:auto}
"""

# (header, cell) per column after the name; a column whose cells are all "-" is dropped
_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("status", None),
    ("shape", lambda c: "x".join(map(str, c.shape))),
    ("max abs", lambda c: fmt(c.max_absdiff)),
    ("max rel", lambda c: fmt(c.max_reldiff)),
    ("mean abs", lambda c: fmt(c.mean_absdiff)),
    ("cosine", lambda c: fmt(c.cosine, ".6f")),
    ("p50", lambda c: fmt(c.percentiles.get("p50"))),
    ("p90", lambda c: fmt(c.percentiles.get("p90"))),
    ("p99", lambda c: fmt(c.percentiles.get("p99"))),
    ("p99.9", lambda c: fmt(c.percentiles.get("p99.9"))),
    ("top-1", lambda c: "-" if c.top1 is None else f"{c.top1:.1%}"),
    ("top-5", lambda c: "-" if c.top5 is None else f"{c.top5:.1%}"),
    ("NaN/Inf", lambda c: _nonfinite(c)),
    ("rtol", lambda c: _bound(c, c.rtol)),
    ("atol", lambda c: _bound(c, c.atol)),
    ("range rtol", lambda c: _bound(c, c.range_rtol) if c.range_rtol else "-"),
)


def _bound(c: Comparison, value: float) -> str:
    """A tolerance cell: ``-`` where the criterion is not a bound (INT8 agreement)."""
    return "-" if c.check == "agreement" else fmt(value)


def _nonfinite(c: Comparison) -> str:
    """``0``, or ``ref nan/inf, out nan/inf`` counts."""
    r, o = c.nonfinite_ref, c.nonfinite_out
    if not sum(r.values()) + sum(o.values()):
        return "0"
    return f"ref {r['nan']}/{r['inf']}, out {o['nan']}/{o['inf']}"


def _status(c: Comparison) -> str:
    if c.passed:
        return '<span class="pass">PASS</span>'
    return f'<span class="fail" title="{html.escape(c.reason)}">FAIL</span>'


def _breakable(name: str) -> str:
    """``name`` HTML-escaped, with a line-break opportunity after each ``_ / . : -``."""
    out = html.escape(name)
    for sep in ("_", "/", ".", ":", "-"):
        out = out.replace(sep, sep + "<wbr>")
    return out


def _table(
    rows: list[tuple[str, Comparison, str]],
    first_col: str = "name",
    omit: tuple[str, ...] = (),
) -> str:
    """A comparison table: one ``(label, comparison, row css class)`` per row.

    Columns named in ``omit`` and columns whose every cell is ``-`` are left out.
    """
    esc = html.escape
    cells = [[(h, "-" if f is None else f(c)) for h, f in _COLUMNS] for _, c, _ in rows]
    keep = [
        j
        for j, (h, f) in enumerate(_COLUMNS)
        if h not in omit and (f is None or any(row[j][1] != "-" for row in cells))
    ]
    head = f'<th class="name">{esc(first_col)}</th>' + "".join(
        f"<th>{esc(_COLUMNS[j][0])}</th>" for j in keep
    )
    body = []
    for (label, c, css), row in zip(rows, cells, strict=True):
        tds = [f'<td class="name">{_breakable(label)}</td>']
        for j in keep:
            header, text = row[j]
            tds.append(
                f"<td>{_status(c)}</td>"
                if header == "status"
                else f'<td class="num">{esc(text)}</td>'
            )
        body.append(f'<tr class="{css}">{"".join(tds)}</tr>')
    return f'<table class="cmp"><tr>{head}</tr>{"".join(body)}</table>'


def _int8_html(b: BackendResult) -> str:
    """INT8 graph: the criterion that decided each output, and the ranked layers."""
    esc = html.escape
    out = ["<h3>INT8 (QDQ) graph</h3>"]
    judged = next((c for c in b.outputs if c.min_top1 is not None), None)
    if judged is not None:
        out.append(
            f"<p>Pass criterion: top-1 agreement &ge; {judged.min_top1:.2%} on class-score "
            "outputs whose reference predicts more than one class; cosine similarity "
            f"&ge; {judged.min_cosine:g} on the others.</p>"
        )
    items = "".join(f'<li class="verdict">{_verdict(c)}</li>' for c in b.outputs)
    out.append(f"<ul>{items}</ul>")
    quantization = getattr(b, "quantization_outputs", None) or []
    if quantization:
        items = "".join(f'<li class="verdict-q">{_verdict(c)}</li>' for c in quantization)
        out.append(
            "<p>The quantization error alone (the graph's Q/DQ run as float, without this "
            f"CPU's int8 kernels):</p><ul>{items}</ul>"
        )
    note = getattr(b, "int8_note", "")
    if note:
        out.append(f'<p class="warn"><b>warning</b>: {esc(note)}</p>')
    if b.layer_losses:
        rows = "".join(
            f'<tr><td class="num">{i}</td><td class="name">{esc(x.layer)}</td>'
            f'<td class="num">{x.nmse:.3e}</td><td class="num">{x.added_nmse:.3e}</td>'
            f'<td class="name"><code>{esc(", ".join(x.nodes))}</code></td></tr>'
            for i, x in enumerate(b.layer_losses, 1)
        )
        out.append(
            '<table class="cmp"><tr><th>rank</th><th class="name">layer</th><th>NMSE</th>'
            '<th>added NMSE</th><th class="name">ONNX nodes (quantize --exclude)</th></tr>'
            f"{rows}</table>"
        )
        if b.exclude_candidates:
            names = esc(" ".join(b.exclude_candidates))
            out.append(
                f"<p>Keep in float32: <code>bnexport quantize ... --exclude {names}</code></p>"
            )
    return "".join(out)


def _verdict(c: Comparison) -> str:
    """One output of an INT8 graph: PASS/FAIL, the criterion that decided and its value."""
    esc = html.escape
    criterion = getattr(c, "criterion", "") or c.check
    if c.reason:  # failed: the reason names the criterion and the values
        text = c.reason
    elif criterion == "top-1 agreement" and c.top1 is not None:
        text = f"top-1 agreement {c.top1:.2%} ≥ {c.min_top1:.2%}"
    elif criterion == "cosine similarity":
        text = f"cosine similarity {c.cosine:.5f} ≥ {c.min_cosine:g}"
    else:
        text = f"check={c.check}"
    if criterion == "cosine similarity" and c.top1 is not None:
        why = "" if "predicts one class" in text else ": the reference predicts one class"
        text += f"; top-1 agreement {c.top1:.2%} is not the criterion here{why}"
    return f"<b>{esc(c.name)}</b>: {_status(c)} on <b>{esc(criterion)}</b>: {esc(text)}"


def render_html(report: ParityReport) -> str:
    """The report as one HTML string (PNG plot inlined)."""
    esc = html.escape
    verdict = (
        '<span class="pass">PASS</span>' if report.passed else '<span class="fail">FAIL</span>'
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<title>bnexport parity report</title>",
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
            f'<img class="plot" alt="per-layer error" width="{WIDTH_PX}" '
            f'src="data:image/png;base64,{data}">'
        )
    for b in report.backends:
        parts.append(f"<h2>{esc(b.backend)} ({esc(b.precision)})</h2>")
        if b.error:
            parts.append(f'<p class="fail">could not run: {esc(b.error)}</p>')
            continue
        parts.append("<h3>Outputs</h3>" + _table([(c.name, c, "") for c in b.outputs]))
        if b.quantized:
            parts.append(_int8_html(b))
        else:
            for c in b.outputs:
                if not c.passed:
                    parts.append(f'<p class="fail">{esc(c.name)}: {esc(c.reason)}</p>')
        if b.layers:
            parts.append(_layers_html(b))
    if report.training is not None:
        parts.append(_training_html(report))
    parts.append("</body></html>")
    return "\n".join(parts)


def _layers_html(b: BackendResult) -> str:
    """The per-layer table (first divergence highlighted) and the skipped layers."""
    esc = html.escape
    first = b.first_failing_layer
    note = (
        "all layers within tolerance"
        if first is None
        else (
            f"first divergence at layer <b>{esc(first.layer)}</b> (tensor "
            f"<code>{esc(first.tensor)}</code>): {esc(first.comparison.reason)}"
        )
    )
    parts = [f"<h3>Layers ({esc(str(b.layer_map_source))} map)</h3><p>{note}</p>"]
    rows = [
        (r.layer, r.comparison, "first" if r is first else "")
        for r in b.layers
        if r.comparison is not None
    ]
    # top-1/top-5 of a layer that is an output are in the outputs table
    parts.append(_table(rows, "layer", omit=("top-1", "top-5")))
    skipped = [r for r in b.layers if r.comparison is None]
    if skipped:
        items = "".join(f"<li><code>{esc(r.layer)}</code>: {esc(r.skipped)}</li>" for r in skipped)
        parts.append(
            f"<details><summary>{len(skipped)} layers skipped</summary><ul>{items}</ul></details>"
        )
    return "".join(parts)


def _training_html(report: ParityReport) -> str:
    """Training mode: Keras ``training=True`` vs FusedNorm ``batch_stats`` per BN layer."""
    esc = html.escape
    parts = ["<h2>Training mode (Keras training=True vs FusedNorm batch_stats)</h2>"]
    rows = []
    skipped = []
    for t in report.training or []:
        if t.skipped:
            skipped.append(f"<li><code>{esc(t.layer)}</code>: {esc(t.skipped)}</li>")
        for path, c in t.comparisons.items():
            rows.append((f"{t.layer} [{path}, ghost={t.virtual_batch_size}]", c, ""))
    if rows:
        parts.append(_table(rows, "layer [path]"))
    if skipped:
        parts.append(f"<p>Skipped:</p><ul>{''.join(skipped)}</ul>")
    for t in report.training or []:
        if t.note:
            parts.append(f"<p><b>{esc(t.layer)}</b>: {esc(t.note)}</p>")
    return "".join(parts)


def write_html(report: ParityReport, path: str | os.PathLike[str]) -> Path:
    """Write :func:`render_html` to ``path`` atomically; returns the path."""
    from bnexport.atomic_write import write_text_atomic

    write_text_atomic(path, render_html(report), make_parents=True)
    return Path(path)
