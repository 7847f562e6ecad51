"""INT8 benchmark: float32 vs INT8 (bnexport.quantize) on onnxruntime CPU, interleaved.

For each model, one run:

* exports the Keras model with ``bnexport.export`` (BNs folded; the float32 graph);
* quantizes it with ``bnexport.quantize`` (MinMax calibration, per-channel symmetric int8
  weights, symmetric int8 activations; ``--method`` to change), and again with
  ``target="cpu"`` (uint8 asymmetric activations, onnxruntime's x86 recommendation;
  not TensorRT-ready) for comparison;
* measures latency of both graphs on onnxruntime CPU (2 intra-op threads, no spinning,
  full graph optimization) at batch 1 and batch 8, median of ``--runs`` runs, the runs of
  every (model, precision, batch) interleaved and the order reversed every other round so
  that load on a shared machine hits every variant alike;
* measures top-1 agreement with Keras (``training=False``) of both graphs: on the digits
  test split (real data; plus test accuracy of Keras, float32 and INT8), and on random
  inputs for the random-weight ImageNet models (``weights=None``, BN statistics
  randomized with a fixed seed as in ``export_bench.py``; inputs are uniform [0, 255]
  images through the model's ``preprocess_input``; calibration and evaluation sets are
  disjoint). A random-weight network tends to rank one class first for every input
  (the table shows how many distinct classes Keras chose), so it also reports the
  *centered* top-1 agreement (argmax of the logits minus their mean over the evaluation
  set: the class each input raises most) and the SQNR of the logits against Keras.

Both errors of each INT8 graph (issue 17): top-1 agreement with Keras of the Q/DQ graph
evaluated as float (onnxruntime, graph optimizations off: the quantization error), of
onnxruntime's int8 kernels on this CPU, and (``--emulate``, small models) of the NumPy
emulation of x86 kernels without VNNI (:mod:`bnexport.quantize.kernel_emulation`). The
CPU's int8 features are printed first (``BNEXPORT_CPU_INT8`` overrides what bnexport
decides, not what onnxruntime runs).

Targets (issue 13): ResNet50 INT8 latency <= 0.5x float32 at batch 8; digits top-1
agreement >= 99 % and test accuracy within 1 point of Keras.

Usage::

    python benchmarks/quantize_bench.py [--models digits,ResNet50] [--runs N] [--json out.json]
        [--emulate digits]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "2")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from export_bench import build, interleaved_latency_ms, make_session  # noqa: E402

MODELS = ("digits", "ResNet50", "MobileNetV2", "EfficientNetB0")
BATCHES = (1, 8)
PREPROCESS = {
    "ResNet50": "resnet50",
    "MobileNetV2": "mobilenet_v2",
    "EfficientNetB0": "efficientnet",
}


def random_images(name: str, n: int, seed: int) -> np.ndarray:
    import keras

    rng = np.random.default_rng(seed)
    raw = rng.uniform(0, 255, (n, 224, 224, 3)).astype(np.float32)
    module = getattr(keras.applications, PREPROCESS[name])
    return np.asarray(module.preprocess_input(raw), np.float32)


def keras_predict(model, x: np.ndarray, batch: int = 16) -> np.ndarray:
    return np.concatenate(
        [np.asarray(model(x[i : i + batch], training=False)) for i in range(0, len(x), batch)]
    )


def onnx_predict(session, name: str, x: np.ndarray, batch: int = 16) -> np.ndarray:
    return np.concatenate(
        [session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def prepare(name: str, calib_n: int, eval_n: int, epochs: int):
    """(keras model, calibration inputs, evaluation inputs, evaluation labels or None)."""
    if name == "digits":
        from bnexport.data.digits import load_digits
        from bnexport.layers.recalibrate import recalibrate
        from bnexport.quickstart import train_digits

        data = load_digits(seed=0)
        model, _ = train_digits(data, epochs=epochs, seed=0)
        recalibrate(model, data.x_train, batch_size=64)
        rng = np.random.default_rng(0)
        calib = data.x_train[rng.permutation(len(data.x_train))[:calib_n]]
        return model, calib.astype(np.float32), data.x_test.astype(np.float32), data.y_test
    model = build(name)
    return model, random_images(name, calib_n, 1), random_images(name, eval_n, 2), None


def bench_model(name: str, args, workdir: Path) -> tuple[dict, list]:
    import bnexport

    t = time.perf_counter()
    model, calib, x_eval, y_eval = prepare(name, args.calib, args.eval, args.epochs)
    fp32_path, int8_path = workdir / f"{name}.onnx", workdir / f"{name}.int8.onnx"
    cpu_path = workdir / f"{name}.int8cpu.onnx"
    export_report = bnexport.export(model, fp32_path, verify=False)
    t_export = time.perf_counter() - t
    t = time.perf_counter()
    # random-weight models miss the default target: measure them anyway
    report = bnexport.quantize(
        fp32_path, int8_path, calib, method=args.method, keep_below_target=True
    )
    t_quant = time.perf_counter() - t
    bnexport.quantize(
        fp32_path, cpu_path, calib, method=args.method, target="cpu", keep_below_target=True
    )
    sessions = {
        "fp32": make_session(str(fp32_path)),
        "int8": make_session(str(int8_path)),
        "int8cpu": make_session(str(cpu_path)),
    }
    input_name = sessions["fp32"].get_inputs()[0].name
    ref = keras_predict(model, x_eval)
    # a random-weight network may predict the same class for every input; agreement on
    # such a model says little, so the table shows how many distinct classes Keras chose
    classes = len(np.unique(ref.argmax(-1)))
    row = {
        "model": name,
        "eval_data": "digits test split" if y_eval is not None else "random inputs",
        "eval_samples": len(x_eval),
        "keras_classes": classes,
        "calibration_samples": len(calib),
        "bn_folded": export_report.summary["folded_forward"]
        + export_report.summary["folded_backward"],
        "bn_left": export_report.summary["fused"] + export_report.summary["kept"],
        "int8_nodes": len(report.quantized_nodes),
        "tensorrt_ready": report.tensorrt_ready,
        "export_s": round(t_export, 2),
        "quantize_s": round(t_quant, 2),
        "size_mb_fp32": round(fp32_path.stat().st_size / 1e6, 2),
        "size_mb_int8": round(int8_path.stat().st_size / 1e6, 2),
    }
    centered_ref = ref - ref.mean(axis=0)
    for precision, session in sessions.items():
        out = onnx_predict(session, input_name, x_eval)
        row[f"agree_{precision}"] = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
        # random-weight nets put one class on top for every input; the class each input
        # raises most above the batch mean is the decision that still varies
        centered = out - out.mean(axis=0)
        row[f"agree_centered_{precision}"] = float(
            np.mean(centered.argmax(-1) == centered_ref.argmax(-1))
        )
        noise = float(np.sum((out.astype(np.float64) - ref) ** 2))
        row[f"sqnr_db_{precision}"] = round(
            float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(noise, 1e-30))), 1
        )
        if y_eval is not None:
            row[f"acc_{precision}"] = float(np.mean(out.argmax(-1) == y_eval))
    if y_eval is not None:
        row["acc_keras"] = float(np.mean(ref.argmax(-1) == y_eval))
    row.update(int8_errors(name, args, {"int8": int8_path, "int8cpu": cpu_path}, ref, x_eval))
    timed = [
        (name, precision, batch, sessions[precision], {input_name: x_eval[:batch]})
        for batch in BATCHES
        for precision in ("fp32", "int8", "int8cpu")
    ]
    return row, timed


def int8_errors(name: str, args, paths: dict, ref: np.ndarray, x_eval: np.ndarray) -> dict:
    """Top-1 agreement with Keras of each INT8 graph's Q/DQ semantics (and emulation)."""
    import onnx

    from bnexport.quantize.compare import make_session as quant_session
    from bnexport.quantize.kernel_emulation import EmulatedSession
    from bnexport.runtime.int8_kernels import saturation_risk

    out = {}
    for precision, path in paths.items():
        session = quant_session(path, optimize=False)
        name_in = session.get_inputs()[0].name
        qdq = onnx_predict(session, name_in, x_eval)
        out[f"agree_qdq_{precision}"] = float(np.mean(qdq.argmax(-1) == ref.argmax(-1)))
        model = onnx.load(path)
        out[f"max_w_{precision}"] = saturation_risk(model).max_abs_weight
        if name in args.emulate:
            emulated = onnx_predict(EmulatedSession(model), name_in, x_eval)
            out[f"agree_emu_{precision}"] = float(np.mean(emulated.argmax(-1) == ref.argmax(-1)))
    return out


def cpu_line() -> str:
    from bnexport.runtime.cpu_features import ENV_VAR, cpu_int8_features, hardware_int8_features

    hardware = hardware_int8_features()
    decided = cpu_int8_features()
    line = f"CPU int8 features: {hardware.describe()}"
    if decided.overridden:
        line += f"; bnexport decides as {decided.source}"
    return line + f" ({ENV_VAR} overrides; onnxruntime runs the hardware's kernels)"


def print_int8_table(rows: list[dict]) -> None:
    """The two errors of every INT8 graph: agreement with Keras."""
    print(
        "\n| model | graph | max abs w_q | quantization (Q/DQ as float) | int8 kernels on this "
        "CPU | emulated non-VNNI kernels |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        for precision, label in (("int8", "tensorrt target"), ("int8cpu", "cpu target")):
            emu = r.get(f"agree_emu_{precision}")
            print(
                f"| {r['model']} | {label} | {r[f'max_w_{precision}']} | "
                f"{r[f'agree_qdq_{precision}']:.2%} | {r[f'agree_{precision}']:.2%} | "
                f"{'-' if emu is None else f'{emu:.2%}'} |"
            )


def print_table(rows: list[dict]) -> None:
    head = (
        "| model | batch | fp32 ms | int8 ms | int8/fp32 | int8 cpu-target ms | cpu/fp32 "
        "| top-1 agree fp32 | top-1 agree int8 "
        "| centered top-1 int8 | SQNR int8 dB | eval data (classes) | BN folded | int8 nodes "
        "| TRT-ready |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        for b in BATCHES:
            fp, q, c = r[f"ms_fp32_b{b}"], r[f"ms_int8_b{b}"], r[f"ms_int8cpu_b{b}"]
            print(
                f"| {r['model']} | {b} | {fp:.2f} | {q:.2f} | {q / fp:.2f} | {c:.2f} | "
                f"{c / fp:.2f} | "
                f"{r['agree_fp32']:.2%} | {r['agree_int8']:.2%} | "
                f"{r['agree_centered_int8']:.2%} | {r['sqnr_db_int8']} | {r['eval_data']} "
                f"({r['eval_samples']}, {r['keras_classes']}) | {r['bn_folded']} | "
                f"{r['int8_nodes']} | "
                f"{'yes' if r['tensorrt_ready'] else 'no'} |"
            )
    for r in rows:
        if "acc_keras" in r:
            print(
                f"\n{r['model']} test accuracy: Keras {r['acc_keras']:.2%}, float32 ONNX "
                f"{r['acc_fp32']:.2%}, INT8 {r['acc_int8']:.2%} "
                f"(cpu target {r['acc_int8cpu']:.2%}) "
                f"({(r['acc_int8'] - r['acc_keras']) * 100:+.2f} points)"
            )
    for r in rows:
        print(
            f"{r['model']}: export {r['export_s']} s, quantize {r['quantize_s']} s, "
            f"size {r['size_mb_fp32']} -> {r['size_mb_int8']} MB"
        )


def check_targets(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["model"] == "ResNet50":
            ratio = r["ms_int8_b8"] / r["ms_fp32_b8"]
            verdict = "PASS" if ratio <= 0.5 else "MISS"
            lines.append(f"{verdict}: ResNet50 int8/fp32 latency at batch 8 = {ratio:.2f} (<= 0.5)")
            cpu = r["ms_int8cpu_b8"] / r["ms_fp32_b8"]
            lines.append(f"      (target='cpu' graph: {cpu:.2f})")
        if r["model"] == "digits":
            ok = r["agree_int8"] >= 0.99
            lines.append(
                f"{'PASS' if ok else 'MISS'}: digits top-1 agreement {r['agree_int8']:.2%} (>= 99%)"
            )
            gap = abs(r["acc_int8"] - r["acc_keras"]) * 100
            lines.append(
                f"{'PASS' if gap <= 1 else 'MISS'}: digits accuracy gap {gap:.2f} points (<= 1)"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", type=int, default=20, help="timed runs per variant")
    parser.add_argument("--calib", type=int, default=64, help="calibration samples")
    parser.add_argument("--eval", type=int, default=64, help="random-input evaluation samples")
    parser.add_argument("--epochs", type=int, default=10, help="digits training epochs")
    parser.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"))
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument(
        "--emulate",
        default="digits",
        help="models whose non-VNNI kernel error is emulated in NumPy (slow on big models)",
    )
    args = parser.parse_args(argv)
    args.emulate = [m.strip() for m in args.emulate.split(",") if m.strip()]
    print(cpu_line(), flush=True)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    rows, timed = [], []
    with tempfile.TemporaryDirectory(prefix="quantize-bench-") as tmp:
        for name in names:
            print(f"[{name}] export + quantize ...", file=sys.stderr, flush=True)
            row, variants = bench_model(name, args, Path(tmp))
            rows.append(row)
            timed.extend(variants)
        print(f"timing {len(timed)} variants x {args.runs} runs ...", file=sys.stderr, flush=True)
        medians = interleaved_latency_ms([v[3] for v in timed], [v[4] for v in timed], args.runs)
    by_model = {r["model"]: r for r in rows}
    for (name, precision, batch, _, _), ms in zip(timed, medians, strict=True):
        by_model[name][f"ms_{precision}_b{batch}"] = round(ms, 3)
    print_table(rows)
    print_int8_table(rows)
    print()
    for line in check_targets(rows):
        print(line)
    if args.json:
        from bnexport.runtime.cpu_features import cpu_int8_features, hardware_int8_features

        cpu = {
            "hardware": hardware_int8_features().to_dict(),
            "decided": cpu_int8_features().to_dict(),
        }
        Path(args.json).write_text(
            json.dumps({"rows": rows, "args": vars(args), "cpu": cpu}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
