"""Graph-pass timings on a synthetic ResNet-sized graph: fold, float16 conversion, layout.

The graph is ``blocks`` × (Conv 3×3 → BatchNormalization → Relu) at ``channels`` channels
(``blocks=40, channels=256``: ~94 MB of float32 weights, like ResNet-50), plus tf2onnx's
input-BN pattern ``Mul → Add → Transpose`` in front of the first Conv, for the layout
pass. Each stage runs ``--rounds`` times; the table shows the median seconds.

Run ``python benchmarks/fold_bench.py [--blocks 40] [--channels 256] [--rounds 3]
[--json out.json]``. To compare two versions of the passes, run the script with each on
``PYTHONPATH`` (the layout stage uses ``sink_layout_ops`` or, in older trees,
``sink_transposes`` + ``sink_reshapes``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import onnx
from onnx import helper, numpy_helper


def build_graph(blocks: int, channels: int, size: int = 14) -> tuple[onnx.ModelProto, dict]:
    """The synthetic model and its ``bn_nodes`` map (the input BN's Mul/Add -> layer)."""
    rng = np.random.default_rng(0)
    c = channels
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "in_s"),
        numpy_helper.from_array(rng.normal(0, 1, c).astype(np.float32), "in_b"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "in_s"], ["in_m"], name="in_bn_mul"),
        helper.make_node("Add", ["in_m", "in_b"], ["in_a"], name="in_bn_add"),
        helper.make_node("Transpose", ["in_a"], ["h0"], name="to_nchw", perm=[0, 3, 1, 2]),
    ]
    for k in range(blocks):
        w = rng.normal(0, 0.05, (c, c, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{k}"))
        for name, value in (
            ("g", rng.uniform(0.5, 2, c)),
            ("b", rng.normal(0, 1, c)),
            ("m", rng.normal(0, 1, c)),
            ("v", rng.uniform(0.5, 2, c)),
        ):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}{k}"))
        nodes += [
            helper.make_node("Conv", [f"h{k}", f"W{k}"], [f"c{k}"], name=f"conv{k}", pads=[1] * 4),
            helper.make_node(
                "BatchNormalization",
                [f"c{k}", f"g{k}", f"b{k}", f"m{k}", f"v{k}"],
                [f"n{k}"],
                name=f"bn{k}",
            ),
            helper.make_node("Relu", [f"n{k}"], [f"h{k + 1}"], name=f"relu{k}"),
        ]
    graph = helper.make_graph(
        nodes,
        "synthetic",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", size, size, c])],
        [helper.make_tensor_value_info(f"h{blocks}", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"in_bn_mul": "input_bn", "in_bn_add": "input_bn"}


def _layout(model: onnx.ModelProto, bn_nodes: dict) -> onnx.ModelProto:
    try:
        from bnexport.export.passes.layout import sink_layout_ops
    except ImportError:  # an older tree: the protobuf version
        from bnexport.export.layout import sink_reshapes, sink_transposes

        model = copy.deepcopy(model)
        sink_transposes(model, bn_nodes)
        sink_reshapes(model, bn_nodes)
        return model
    return sink_layout_ops(model, bn_nodes)


def _median_time(fn, rounds: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> dict:
    """Run the stages, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from bnexport.export.passes.fold_batchnorm import fold_batchnorm_with_report
    from bnexport.graph.float16 import convert_to_float16

    model, bn_nodes = build_graph(args.blocks, args.channels)
    mb = sum(i.ByteSize() for i in model.graph.initializer) / 2**20
    rows = {}
    rows["layout"], moved = _median_time(lambda: _layout(model, bn_nodes), args.rounds)
    rows["fold"], (folded, records) = _median_time(
        lambda: fold_batchnorm_with_report(moved, names=bn_nodes), args.rounds
    )
    rows["float16"], (half, _) = _median_time(lambda: convert_to_float16(folded), args.rounds)
    counts: dict[str, int] = {}
    for node in half.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    result = {
        "blocks": args.blocks,
        "channels": args.channels,
        "weights_mb": round(mb, 1),
        "seconds": {k: round(v, 4) for k, v in rows.items()},
        "folded": sum(r.action.startswith("folded") for r in records),
        "op_counts": counts,
    }
    print(f"synthetic graph: {args.blocks} Conv+BN+Relu blocks, {mb:.1f} MB float32 weights")
    print(f"{'stage':<10}{'median s':>10}")
    for stage, seconds in rows.items():
        print(f"{stage:<10}{seconds:>10.3f}")
    print(f"folded {result['folded']} of {len(records)} BNs; float16 ops: {counts}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
