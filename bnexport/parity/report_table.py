"""Terminal rendering of a :class:`~bnexport.parity.report.ParityReport` with rich."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from bnexport.parity.compare import Comparison
    from bnexport.parity.report import BackendResult, ParityReport

#: failing layers listed in the terminal (the HTML report lists all)
MAX_LAYER_ROWS = 10


def fmt(value: float | None, spec: str = ".3g") -> str:
    """Format a float for a table cell (``-`` for None)."""
    return "-" if value is None else format(value, spec)


def _nonfinite(c: Comparison) -> str:
    r, o = c.nonfinite_ref, c.nonfinite_out
    if not (sum(r.values()) + sum(o.values())):
        return "0"
    return f"ref {r['nan']}nan/{r['inf']}inf, out {o['nan']}nan/{o['inf']}inf"


def _status(ok: bool) -> str:
    return "[green]PASS[/green]" if ok else "[bold red]FAIL[/bold red]"


def _topk(c: Comparison) -> str:
    if c.top1 is None:
        return "-"
    return f"{c.top1:.0%}" + ("" if c.top5 is None else f"/{c.top5:.0%}")


def comparison_row(label: str, c: Comparison) -> list[str]:
    """Cells of one comparison row (percentiles and shapes are in the JSON/HTML reports)."""
    return [
        label,
        fmt(c.max_absdiff, ".2e"),
        fmt(c.max_reldiff, ".2e"),
        fmt(c.mean_absdiff, ".2e"),
        fmt(c.cosine, ".6f"),
        _topk(c),
        _nonfinite(c),
        _status(c.passed),
    ]


HEADERS = ["name", "max|d|", "max rel", "mean|d|", "cosine", "top1/5", "NaN/Inf", ""]


def _new_table(title: str, names: list[str]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    name_width = min(max([len(n) for n in names] + [4]), 32)
    for h in HEADERS:
        if h == "name":
            table.add_column(h, min_width=name_width, overflow="fold")
        else:
            table.add_column(h, justify="left" if h == "NaN/Inf" else "right", no_wrap=True)
    return table


def _int8_lines(b: BackendResult) -> list[Any]:
    """INT8 graph: the primary metric, and the layers that add most error."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    judged = next((c for c in b.outputs if c.min_top1 is not None), None)
    rule = (
        f"top-1 agreement >= {judged.min_top1:.0%} on class scores, cosine >= "
        f"{judged.min_cosine:g} on other outputs"
        if judged is not None
        else "the criterion given"
    )
    top1 = b.top1
    metric = "no class-score output" if top1 is None else f"top-1 agreement {top1:.2%}"
    lines: list[Any] = [f"INT8 (QDQ) graph, pass = {rule}: [bold]{metric}[/bold]"]
    if b.quantization_outputs:
        q = b.quantization_top1
        lines.append(
            "quantization error alone (Q/DQ as float, no int8 kernels): "
            + ("no class-score output" if q is None else f"top-1 agreement {q:.2%}")
        )
    if b.int8_note:
        lines.append(f"[yellow]warning[/yellow]: {escape(b.int8_note)}")
    if not b.layer_losses:
        return lines
    table = Table(
        title=f"layers adding most INT8 error ({b.backend})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for h in ("rank", "layer", "NMSE", "added", "cosine", "ONNX nodes (--exclude)"):
        table.add_column(h, overflow="fold")
    cosine = {r.layer: r.comparison.cosine for r in b.layers if r.comparison is not None}
    for i, loss in enumerate(b.layer_losses[:MAX_LAYER_ROWS], 1):
        table.add_row(
            str(i),
            loss.layer,
            fmt(loss.nmse, ".2e"),
            fmt(loss.added_nmse, ".2e"),
            fmt(cosine.get(loss.layer), ".5f"),
            ", ".join(loss.nodes) or "-",
        )
    lines.append(table)
    candidates = b.exclude_candidates
    if candidates:
        lines.append(
            "keep them in float32: bnexport quantize ... --exclude " + " ".join(candidates)
        )
    return lines


def render(report: ParityReport) -> Any:
    """Build the rich renderable of ``report``."""
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    parts: list[Any] = []
    for b in report.backends:
        title = f"Keras vs {b.backend} ({b.precision}, {report.samples} samples)"
        if b.error:
            # escaped: rich would read "[tensorrt]" in an install hint as a style tag
            parts.append(f"[bold red]{title}: could not run[/bold red]: {escape(b.error)}")
            continue
        table = _new_table(title, [c.name for c in b.outputs])
        for c in b.outputs:
            table.add_row(*comparison_row(c.name, c))
        parts.append(table)
        for c in b.outputs:
            if not c.passed:
                parts.append(f"  [red]{c.name}[/red]: {c.reason}")
        if b.quantized:
            parts.extend(_int8_lines(b))
        if b.layers and not b.quantized:
            compared = [r for r in b.layers if r.comparison is not None]
            failing = [r for r in compared if r.failed]
            first = b.first_failing_layer
            summary = (
                f"per-layer ({b.layer_map_source} map): {len(compared)} layers compared, "
                f"{len(b.layers) - len(compared)} skipped, {len(failing)} out of tolerance"
            )
            if first is not None:
                summary += f"; [bold red]first divergence at layer {first.layer!r}[/bold red]"
                summary += f" (tensor {first.tensor!r})"
            parts.append(summary)
            if failing:
                lt = _new_table(
                    f"first failing layers ({b.backend})",
                    [r.layer for r in failing[:MAX_LAYER_ROWS]],
                )
                for r in failing[:MAX_LAYER_ROWS]:
                    lt.add_row(*comparison_row(r.layer, r.comparison))
                parts.append(lt)
    if report.training is not None:
        tt = Table(
            title="training mode: Keras training=True vs FusedNorm batch_stats",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        for h in ("layer", "ghost", "path", "max abs", "max rel", "cosine", ""):
            tt.add_column(h)
        for t in report.training:
            if t.skipped:
                tt.add_row(t.layer, "-", "-", "-", "-", "-", f"skipped: {t.skipped}")
            for path, c in t.comparisons.items():
                tt.add_row(
                    t.layer,
                    str(t.virtual_batch_size),
                    path,
                    fmt(c.max_absdiff),
                    fmt(c.max_reldiff),
                    fmt(c.cosine, ".6f"),
                    _status(c.passed),
                )
        parts.append(tt)
        for t in report.training:
            if t.note:
                parts.append(f"  [yellow]{t.layer}[/yellow]: {t.note}")
    verdict = (
        "[bold green]parity: PASS[/bold green]"
        if report.passed
        else ("[bold red]parity: FAIL[/bold red]")
    )
    parts.append(f"{verdict} ({report.seconds:.1f} s)")
    return Group(*parts)
