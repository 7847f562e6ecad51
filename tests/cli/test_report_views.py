"""What the CLI prints for a large model: a short summary; -v: a table that fits 80 columns."""

from __future__ import annotations

from rich.console import Console

from bnexport.export.report import ExportReport, FoldRecord, VerifyResult


def _report(n: int = 170) -> ExportReport:
    records = [
        FoldRecord(
            f"block_{i}_expanded_conv_depthwise_BN",
            "folded_forward",
            f"mobilenetv2_1.00_224_1/block_{i}_depthwise_1/depthwise",
        )
        for i in range(n - 2)
    ]
    records.append(
        FoldRecord(
            "head_bn",
            "fused",
            "head_bn/BatchNormalization",
            "BN input comes from Relu 're_lu/Relu', not Conv/ConvTranspose/Gemm/MatMul",
        )
    )
    records.append(
        FoldRecord("unused_bn", "kept", None, "not part of the exported graph (output unused)")
    )
    verify = VerifyResult(True, 1.5e-6, 1e-4, "predictions", 1e-4, 1e-4, 2)
    return ExportReport(
        path="/tmp/mnv2.onnx",
        opset=17,
        dtype="float32",
        io_dtype="float32",
        fused_norm="onnx",
        dynamic_batch=True,
        records=records,
        verify=verify,
        node_count=106,
        timings={"load": 1.0, "convert": 2.0, "total": 3.0},
    )


def _render(renderable, width: int = 80) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


def test_summary_is_short_whatever_the_model_size():
    lines = _render(_report().summary_view())
    text = "\n".join(lines)
    assert len(lines) < 25 and max(len(line) for line in lines) <= 80
    assert "170 BN: 168 folded forward, 0 folded backward, 1 fused, 1 kept" in text
    assert "head_bn" in text and "unused_bn" in text and "output unused" in text
    assert "block_3_" not in text  # folded BNs are counted, not listed
    assert "verify passed" in text


def test_verbose_table_fits_80_columns_without_breaking_actions():
    lines = _render(_report().table())
    assert max(len(line) for line in lines) <= 80
    assert sum("folded_forward" in line for line in lines) == 168  # never split over lines
