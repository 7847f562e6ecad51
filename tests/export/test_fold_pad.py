"""``MergePadIntoConvPass``: a constant zero ``Pad`` into the next ``Conv``'s ``pads``.

Every rewritten graph is checked three ways: its op counts and the Conv's new ``pads``;
onnxruntime (graph optimizations off) on it against a NumPy reference written here
(``np.pad`` then a direct convolution, float64), within
``max|onnx − ref| <= 1e-5·max|ref|`` for float32 (a few dozen products summed in float32)
and ``1e-2·max|ref|`` for float16 (float16 inputs, weights and accumulation); and against
the original graph run the same way (``onnx_graphs.assert_same_outputs``, full checker).
The pass runs inside ``fold_batchnorm`` (before the fold passes), so the tests call that.
Cases it must leave alone (reflect/edge, nonzero value, crops, channel pads, shared Pads,
AveragePool, SAME Convs) keep their ``Pad`` and their numbers.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_graphs import assert_same_outputs, bn_params, build, op_counts, run_ort

from bnexport.export.passes.fold_batchnorm import fold_batchnorm_with_report
from bnexport.export.passes.merge_pad import MergePadIntoConvPass

REF_TOL = {np.float32: 1e-5, np.float16: 1e-2}


def conv_ref(x, w, b, pads, strides=(1, 1), dilations=(1, 1), group=1) -> np.ndarray:
    """ONNX ``Conv`` (NCHW, 2-D) in float64: zero pads ``[t, l, b, r]``, then the windows."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    x = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    _, _, h, wd = x.shape
    m, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilations
    oh, ow = (h - (kh - 1) * dh - 1) // sh + 1, (wd - (kw - 1) * dw - 1) // sw + 1
    mg = m // group
    out = np.zeros((x.shape[0], m, oh, ow))
    for g in range(group):
        xs, ws = x[:, g * cg : (g + 1) * cg], w[g * mg : (g + 1) * mg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh : i * dh + (oh - 1) * sh + 1 : sh,
                           j * dw : j * dw + (ow - 1) * sw + 1 : sw]  # fmt: skip
                out[:, g * mg : (g + 1) * mg] += np.einsum("ncxy,mc->nmxy", patch, ws[:, :, i, j])
    if b is not None:
        out += b.astype(np.float64).reshape(1, -1, 1, 1)
    return out


def assert_near_ref(got: np.ndarray, ref: np.ndarray, dtype) -> None:
    assert got.shape == ref.shape
    err = float(np.max(np.abs(got.astype(np.float64) - ref)))
    assert err <= REF_TOL[dtype] * float(np.max(np.abs(ref))), err


def conv_of(model: onnx.ModelProto) -> onnx.NodeProto:
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
    return conv


def pads_of(node: onnx.NodeProto) -> list[int]:
    for attr in node.attribute:
        if attr.name == "pads":
            return list(attr.ints)
    return []


def auto_pad_of(node: onnx.NodeProto) -> str:
    for attr in node.attribute:
        if attr.name == "auto_pad":
            return attr.s.decode()
    return "NOTSET"


# -- merged --------------------------------------------------------------------------------
MERGE_CASES = {
    # name: (Pad pads NCHW [b…, e…], Conv attrs, group, stride, dilation, merged pads)
    "resnet_stem": ([0, 0, 3, 3, 0, 0, 3, 3], "pads=[0,0,0,0]", 1, 2, 1, [3, 3, 3, 3]),
    "asymmetric_valid": ([0, 0, 0, 1, 0, 0, 1, 0], 'auto_pad="VALID"', 1, 2, 1, [0, 1, 1, 0]),
    "adds_to_conv_pads": ([0, 0, 1, 2, 0, 0, 0, 1], "pads=[1,0,1,1]", 1, 1, 1, [2, 2, 1, 2]),
    "depthwise_dilated": ([0, 0, 2, 2, 0, 0, 2, 2], "pads=[0,0,0,0]", "dw", 1, 2, [2, 2, 2, 2]),
    "grouped_no_pads_attr": ([0, 0, 1, 1, 0, 0, 1, 1], "kernel_shape=[3,3]", 2, 1, 1, [1, 1, 1, 1]),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", sorted(MERGE_CASES))
def test_zero_pad_merges_into_conv(case, bias, dtype):
    pads, conv_attrs, group, stride, dilation, merged = MERGE_CASES[case]
    rng = np.random.default_rng(3)
    c_in = 4
    groups = c_in if group == "dw" else group
    c_out = 8 if group == "dw" else 6
    inits = {
        "P": np.asarray(pads, np.int64),
        "W": rng.normal(0, 0.5, (c_out, c_in // groups, 3, 3)),
        "B": rng.normal(0, 1, c_out),
    }
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,{c_in},9,10] x) => (T[N,{c_out},?,?] y) {{
          p = Pad(x, P)
          y = Conv<{conv_attrs}, group={groups}, strides=[{stride},{stride}],
                   dilations=[{dilation},{dilation}]>(p, W{", B" if bias else ""})
        }}""",
        inits,
        dtype,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Conv": 1}
    assert records == []
    conv = conv_of(folded)
    assert pads_of(conv) == merged and auto_pad_of(conv) == "NOTSET"
    x = rng.normal(0, 1, (2, c_in, 9, 10)).astype(dtype)
    (got,) = run_ort(folded, {"x": x})
    w, b = inits["W"].astype(dtype), inits["B"].astype(dtype) if bias else None
    old = pads_of(conv_of(model)) or [0, 0, 0, 0]
    x_padded = np.pad(x, [(pads[k], pads[k + 4]) for k in range(4)])
    ref = conv_ref(x_padded, w, b, old, (stride, stride), (dilation, dilation), groups)
    assert_near_ref(got, ref, dtype)
    assert_same_outputs(model, folded, {"x": x}, dtype)


def test_pad_with_axes_input_and_explicit_zero_value():
    """Opset 18's ``axes`` input and a given ``constant_value`` of 0."""
    rng = np.random.default_rng(4)
    inits = {
        "P": np.asarray([2, 1, 0, 3], np.int64),  # axes (-2, -1): H (2, 0), W (1, 3)
        "ax": np.asarray([-2, -1], np.int64),
        "zero": np.asarray(0.0),
        "W": rng.normal(0, 0.5, (5, 3, 3, 3)),
    }
    model = build(
        """<ir_version: 8, opset_import: ["" : 18]>
        g (T[N,3,7,7] x) => (T[N,5,?,?] y) {
          p = Pad(x, P, zero, ax)
          y = Conv<pads=[0,0,0,0]>(p, W)
        }""",
        inits,
    )
    folded, _ = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Conv": 1}
    assert pads_of(conv_of(folded)) == [2, 1, 0, 3]
    x = rng.normal(0, 1, (2, 3, 7, 7)).astype(np.float32)
    (got,) = run_ort(folded, {"x": x})
    ref = conv_ref(np.pad(x, [(0, 0), (0, 0), (2, 0), (1, 3)]), inits["W"], None, [0] * 4)
    assert_near_ref(got, ref, np.float32)
    assert_same_outputs(model, folded, {"x": x})


def test_pad_before_transpose_merges_through_it():
    """``Pad`` on NHWC, ``Transpose`` to NCHW, ``Conv``: the pads move to the Conv's H/W."""
    rng = np.random.default_rng(5)
    inits = {
        "P": np.asarray([0, 0, 1, 0, 0, 1, 2, 0], np.int64),
        "W": rng.normal(0, 0.5, (4, 3, 3, 3)),
    }
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,8,8,3] x) => (T[N,4,?,?] y) {
          p = Pad(x, P)
          t = Transpose<perm=[0,3,1,2]>(p)
          y = Conv<pads=[0,0,0,0], strides=[2,2]>(t, W)
        }""",
        inits,
    )
    folded, _ = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Transpose": 1, "Conv": 1}
    assert pads_of(conv_of(folded)) == [0, 1, 1, 2]
    x = rng.normal(0, 1, (2, 8, 8, 3)).astype(np.float32)
    (got,) = run_ort(folded, {"x": x})
    padded = np.pad(x, [(0, 0), (0, 1), (1, 2), (0, 0)]).transpose(0, 3, 1, 2)
    assert_near_ref(got, conv_ref(padded, inits["W"], None, [0] * 4, (2, 2)), np.float32)
    assert_same_outputs(model, folded, {"x": x})


def test_scale_only_normalization_before_pad_now_folds_backward():
    """EfficientNet's input ``Mul`` (zero shift) → Pad → Conv: after the merge the ``Mul``
    folds backward into the Conv (exact: the padded zeros stay zeros, ``0·s = 0``)."""
    rng = np.random.default_rng(6)
    inits = {
        "s": rng.uniform(0.5, 2.0, (1, 3, 1, 1)),  # per channel
        "P": np.asarray([0, 0, 0, 0, 0, 0, 1, 1], np.int64),
        "W": rng.normal(0, 0.5, (6, 3, 3, 3)),
    }
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,8,8] x) => (T[N,6,4,4] y) {
          n = Mul(x, s)
          p = Pad(n, P)
          y = Conv<pads=[0,0,0,0], strides=[2,2]>(p, W)
        }""",
        inits,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Conv": 1}
    assert [r.action for r in records] == ["folded_backward"]
    x = rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    (got,) = run_ort(folded, {"x": x})
    padded = np.pad(x * inits["s"], [(0, 0), (0, 0), (0, 1), (0, 1)])
    assert_near_ref(got, conv_ref(padded, inits["W"], None, [0] * 4, (2, 2)), np.float32)
    assert_same_outputs(model, folded, {"x": x})


def test_bn_with_shift_before_pad_stays_exact():
    """A BN with a nonzero shift cannot fold backward into the (now padded) Conv: the
    padded border would see ``t`` instead of 0. The Pad merges; the BN stays one node."""
    rng = np.random.default_rng(7)
    inits = {**bn_params(rng, 3), "P": np.asarray([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
             "W": rng.normal(0, 0.5, (6, 3, 3, 3))}  # fmt: skip
    model = build(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,8,8] x) => (T[N,6,8,8] y) {
          n = BatchNormalization(x, g, b, m, v)
          p = Pad(n, P)
          y = Conv<pads=[0,0,0,0]>(p, W)
        }""",
        inits,
    )
    folded, records = fold_batchnorm_with_report(model)
    assert "Pad" not in op_counts(folded)
    assert [r.action for r in records] == ["fused"]
    assert "nonzero padding" in records[0].reason
    x = rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    (got,) = run_ort(folded, {"x": x})
    g, b, m, v = (inits[k].reshape(1, -1, 1, 1) for k in "gbmv")
    normed = (x - m) / np.sqrt(v + 1e-5) * g + b
    padded = np.pad(normed, [(0, 0), (0, 0), (1, 1), (1, 1)])
    assert_near_ref(got, conv_ref(padded, inits["W"], None, [0] * 4), np.float32)
    assert_same_outputs(model, folded, {"x": x})


# -- left alone ----------------------------------------------------------------------------
STAY_CASES = {
    "reflect": ('p = Pad<mode="reflect">(x, P)', [0, 0, 1, 1, 0, 0, 1, 1], "mode='reflect'"),
    "edge": ('p = Pad<mode="edge">(x, P)', [0, 0, 1, 1, 0, 0, 1, 1], "mode='edge'"),
    "nonzero_value": ("p = Pad(x, P, one)", [0, 0, 1, 1, 0, 0, 1, 1], "nonzero value"),
    "negative": ("p = Pad(x, P)", [0, 0, 1, -1, 0, 0, 1, 1], "negative pads"),
    "channel_axis": ("p = Pad(x, P)", [0, 1, 1, 1, 0, 0, 1, 1], "batch or channel axis"),
}


@pytest.mark.parametrize("case", sorted(STAY_CASES))
def test_pad_that_differs_from_conv_padding_stays(case):
    line, pads, why = STAY_CASES[case]
    rng = np.random.default_rng(8)
    inits = {
        "P": np.asarray(pads, np.int64),
        "one": np.asarray(1.0),
        "W": rng.normal(0, 0.5, (5, 4 if case == "channel_axis" else 3, 3, 3)),
    }
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,8,8] x) => (T[N,5,?,?] y) {{
          {line}
          y = Conv<pads=[0,0,0,0]>(p, W)
        }}""",
        inits,
    )
    merge = MergePadIntoConvPass()
    ir_model = ir.serde.deserialize_model(model)
    assert not merge(ir_model).modified
    assert why in next(iter(merge.refusals.values()))
    folded, _ = fold_batchnorm_with_report(model)
    assert op_counts(folded) == {"Pad": 1, "Conv": 1}
    x = rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    assert_same_outputs(model, folded, {"x": x})


GRAPH_STAY_CASES = {
    "two_consumers": (
        """p = Pad(x, P)
          y = Conv<pads=[0,0,0,0]>(p, W)
          z = Relu(p)""",
        "(T[N,5,8,8] y, T[N,3,10,10] z)",
        {"Pad": 1, "Conv": 1, "Relu": 1},
    ),
    "graph_output": (
        """p = Pad(x, P)
          y = Conv<pads=[0,0,0,0]>(p, W)""",
        "(T[N,5,8,8] y, T[N,3,10,10] p)",
        {"Pad": 1, "Conv": 1},
    ),
    "average_pool": (
        """p = Pad(x, P)
          y = AveragePool<kernel_shape=[3,3], pads=[0,0,0,0]>(p)""",
        "(T[N,3,8,8] y)",
        {"Pad": 1, "AveragePool": 1},
    ),
    "same_conv": (
        """p = Pad(x, P)
          y = Conv<auto_pad="SAME_UPPER">(p, W)""",
        "(T[N,5,10,10] y)",
        {"Pad": 1, "Conv": 1},
    ),
    "transpose_shared": (
        """t0 = Transpose<perm=[0,2,3,1]>(x)
          p = Pad(t0, Q)
          t = Transpose<perm=[0,3,1,2]>(p)
          y = Conv<pads=[0,0,0,0]>(t, W)
          z = Relu(t)""",
        "(T[N,5,8,8] y, T[N,3,10,10] z)",
        {"Transpose": 2, "Pad": 1, "Conv": 1, "Relu": 1},
    ),
}


@pytest.mark.parametrize("case", sorted(GRAPH_STAY_CASES))
def test_pad_whose_output_is_needed_elsewhere_stays(case):
    """Two consumers, a graph output, AveragePool (``count_include_pad`` would change its
    divisor), a SAME Conv, a Transpose read by another node too: the Pad stays."""
    body, outputs, counts = GRAPH_STAY_CASES[case]
    rng = np.random.default_rng(9)
    inits = {
        "P": np.asarray([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "Q": np.asarray([0, 1, 1, 0, 0, 1, 1, 0], np.int64),
        "W": rng.normal(0, 0.5, (5, 3, 3, 3)),
    }
    model = build(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (T[N,3,8,8] x) => {outputs} {{
          {body}
        }}""",
        inits,
    )
    folded, _ = fold_batchnorm_with_report(model)
    assert op_counts(folded) == counts
    x = rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    assert_same_outputs(model, folded, {"x": x})
