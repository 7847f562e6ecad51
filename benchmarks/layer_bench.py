"""Training-step time of bnexport.BatchNormalization vs Keras 3 and tf-keras, and recalibrate.

Usage::

    python benchmarks/layer_bench.py [--steps 30] [--quick] [--json out.json]

Part 1 times one SGD training step (forward, backward, variable updates, batch 64, CPU)
of (a) a small ResNet-style CNN and (b) a BN-heavy stack, built with
``keras.layers.BatchNormalization``, ``tf_keras.layers.BatchNormalization`` (fused by
default) and ``bnexport.BatchNormalization``, for the modes default, renorm, ghost batch
(virtual_batch_size=16) and synchronized (MirroredStrategy over 2 logical CPUs, 32
examples per replica). All three use the same hand-written step (tape + ``assign_sub``)
inside one ``tf.function`` so only the layers differ. For the default mode the same
models without BN (Keras 3 and tf-keras) are timed too, so the time spent in BN itself
is reported next to the whole step. Reported: median ms per step (wall clock and
process CPU time, best of 3 interleaved rounds: the machine is shared) and the ratios
the issue targets (ours default <= 1.0x the faster peer; our renorm and ghost <= 1.3x
our default).

Part 2 trains a small CNN on scikit-learn's digits for a few steps with momentum 0.99
(so the EMA statistics are poor) and reports test accuracy with the EMA statistics and
after ``bnexport.recalibrate`` (sequential and parallel modes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

BATCH = 64
MODES = ("default", "renorm", "ghost", "sync")


def configure(threads: int, inter_threads: int) -> None:
    """Two logical CPU devices (for MirroredStrategy) and a fixed thread budget."""
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
    tf.config.threading.set_inter_op_parallelism_threads(inter_threads)
    tf.config.threading.set_intra_op_parallelism_threads(threads)


# ---------------------------------------------------------------- models
def resnet(layers: Any, bn: Any) -> tuple[Any, Any]:
    """Small ResNet-style CNN: stem + 3 stages of one basic block (16/32/64 ch), 32x32x3."""
    inputs = layers.Input((32, 32, 3))
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    x = layers.ReLU()(bn()(x))
    for filters, stride in ((16, 1), (32, 2), (64, 2)):
        shortcut = x
        y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        y = layers.ReLU()(bn()(y))
        y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
        y = bn()(y)
        if stride != 1 or shortcut.shape[-1] != filters:
            shortcut = bn()(layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut))
        x = layers.ReLU()(layers.Add()([y, shortcut]))
    x = layers.GlobalAveragePooling2D()(x)
    return inputs, layers.Dense(10)(x)


def bn_heavy(layers: Any, bn: Any) -> tuple[Any, Any]:
    """BN-dominated stack: 8 x (BN, ReLU, depthwise 3x3) on 32x32x32 activations."""
    inputs = layers.Input((32, 32, 3))
    x = layers.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    for _ in range(8):
        x = layers.ReLU()(bn()(x))
        x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = layers.GlobalAveragePooling2D()(bn()(x))
    return inputs, layers.Dense(10)(x)


MODELS = {"resnet": resnet, "bn_heavy": bn_heavy}


def bn_factory(impl: str, mode: str) -> Any:
    """A zero-argument BN constructor for ``impl`` in ``mode`` (None: not supported)."""
    kwargs: dict[str, Any] = {}
    if mode == "renorm":
        kwargs = {"renorm": True, "renorm_clipping": {"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0}}
    elif mode == "ghost":
        kwargs = {"virtual_batch_size": 16}
    elif mode == "sync":
        kwargs = {"synchronized": True}
    if impl.endswith("_nobn"):  # baseline: the same model without normalization
        framework = __import__(impl[: -len("_nobn")])
        return lambda: framework.layers.Activation("linear")
    if impl == "keras":
        import keras

        if mode == "ghost":
            return None
        return lambda: keras.layers.BatchNormalization(**kwargs)
    if impl == "tf_keras":
        import tf_keras

        return lambda: tf_keras.layers.BatchNormalization(**kwargs)
    import bnexport

    return lambda: bnexport.BatchNormalization(**kwargs)


def build(impl: str, model_name: str, mode: str) -> Any:
    """The model for ``impl`` (a tf_keras model for tf_keras, else a Keras 3 model)."""
    bn = bn_factory(impl, mode)
    if bn is None:
        return None
    if impl.startswith("tf_keras"):
        import tf_keras

        tf_keras.utils.set_random_seed(0)
        inputs, outputs = MODELS[model_name](tf_keras.layers, bn)
        return tf_keras.Model(inputs, outputs)
    import keras

    keras.utils.set_random_seed(0)
    inputs, outputs = MODELS[model_name](keras.layers, bn)
    return keras.Model(inputs, outputs)


# ---------------------------------------------------------------- timing
def _loss(model: Any, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    logits = model(x, training=True)
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(y, tf.cast(logits, tf.float32))
    )


def make_step(model: Any, strategy: Any = None) -> Any:
    """One tf.function SGD step (same code for every implementation)."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(BATCH, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, BATCH).astype("int32"))
    variables = model.trainable_variables
    lr = 1e-3
    if strategy is None:

        @tf.function
        def step() -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = _loss(model, x, y)
            for v, g in zip(variables, tape.gradient(loss, variables), strict=True):
                v.assign_sub(lr * g)
            return loss

        return step
    half = BATCH // strategy.num_replicas_in_sync
    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: x[
            ctx.replica_id_in_sync_group * half : (ctx.replica_id_in_sync_group + 1) * half
        ]
    )
    ys = strategy.experimental_distribute_values_from_function(
        lambda ctx: y[
            ctx.replica_id_in_sync_group * half : (ctx.replica_id_in_sync_group + 1) * half
        ]
    )

    def replica(xr: tf.Tensor, yr: tf.Tensor) -> list[tf.Tensor]:
        with tf.GradientTape() as tape:
            loss = _loss(model, xr, yr) / strategy.num_replicas_in_sync
        return tape.gradient(loss, variables)

    @tf.function
    def dstep() -> tf.Tensor:
        grads = strategy.run(replica, args=(xs, ys))
        for v, g in zip(variables, grads, strict=True):
            v.assign_sub(lr * strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None))
        return tf.constant(0.0)

    return dstep


def time_steps(
    steps: dict[str, Any], n: int, rounds: int = 3, warmup: int = 3
) -> dict[str, tuple[float, float]]:
    """``{name: (wall ms, CPU ms)}`` per step, interleaved in ``rounds`` (best round kept).

    The machine is shared, so implementations are timed in interleaved rounds and the
    fastest round's median is kept. CPU ms (process time of all threads) is reported
    too: it is less sensitive to other processes than wall time.
    """
    for step in steps.values():
        for _ in range(warmup):
            step().numpy()
    best = {name: (float("inf"), float("inf")) for name in steps}
    per_round = max(1, n // rounds)
    for _ in range(rounds):
        for name, step in steps.items():
            wall, cpu = [], []
            for _ in range(per_round):
                t0, c0 = time.perf_counter(), time.process_time()
                step().numpy()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            best[name] = (
                min(best[name][0], statistics.median(wall) * 1e3),
                min(best[name][1], statistics.median(cpu) * 1e3),
            )
    return best


_STRATEGY: list[Any] = []


def strategy() -> Any:
    """One MirroredStrategy over two logical CPUs (created once per process)."""
    if not _STRATEGY:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
        _STRATEGY.append(tf.distribute.MirroredStrategy(devices))
    return _STRATEGY[0]


def make_case(impl: str, model_name: str, mode: str) -> Any:
    """The step function of one case, or None when the implementation lacks the mode."""
    if mode == "sync":
        st = strategy()
        with st.scope():
            model = build(impl, model_name, mode)
        return make_step(model, st)
    model = build(impl, model_name, mode)
    return None if model is None else make_step(model)


IMPLS = ("keras", "tf_keras", "ours")
BASELINES = ("keras_nobn", "tf_keras_nobn")


def run_timing(steps: int, models: list[str], modes: list[str]) -> list[dict[str, Any]]:
    """One row per (model, mode): ``{impl: wall ms, impl_cpu: CPU ms, ratios...}``."""
    rows = []
    for model_name in models:
        for mode in modes:
            row: dict[str, Any] = {"model": model_name, "mode": mode}
            cases = {}
            impls = IMPLS + (BASELINES if mode == "default" else ())
            for impl in impls:
                row[impl] = row[f"{impl}_cpu"] = None
                try:
                    step = make_case(impl, model_name, mode)
                    if step is not None:
                        step().numpy()  # trace now: errors surface here
                        cases[impl] = step
                except Exception as exc:  # a peer lacking a mode must not stop the run
                    row[f"{impl}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            for impl, (wall, cpu) in time_steps(cases, steps).items():
                row[impl], row[f"{impl}_cpu"] = wall, cpu
            print(
                f"  {model_name:9s} {mode:8s} " + " ".join(f"{k}={row[k]}" for k in IMPLS),
                file=sys.stderr,
            )
            rows.append(row)
    for row in rows:
        default = next(r for r in rows if r["model"] == row["model"] and r["mode"] == "default")
        for suffix in ("", "_cpu"):
            ours = row[f"ours{suffix}"]
            peers = [row[f"{k}{suffix}"] for k in ("keras", "tf_keras") if row[f"{k}{suffix}"]]
            row[f"ours_vs_best_peer{suffix}"] = ours / min(peers) if peers and ours else None
            ours_def = default[f"ours{suffix}"]
            row[f"ours_vs_ours_default{suffix}"] = ours / ours_def if ours and ours_def else None
            tk, tk_def = row[f"tf_keras{suffix}"], default[f"tf_keras{suffix}"]
            row[f"tf_keras_vs_tf_keras_default{suffix}"] = tk / tk_def if tk and tk_def else None
            if row["mode"] == "default" and row.get(f"keras_nobn{suffix}"):
                # time spent in BN alone: step minus the same model without BN
                k3_base = row[f"keras_nobn{suffix}"]
                row[f"bn_ms{suffix}"] = {
                    "keras": row[f"keras{suffix}"] - k3_base,
                    "tf_keras": row[f"tf_keras{suffix}"] - row[f"tf_keras_nobn{suffix}"],
                    "ours": ours - k3_base,
                }
    return rows


# ---------------------------------------------------------------- recalibrate
def run_recalibration(train_steps: int, seed: int = 0) -> dict[str, Any]:
    """Digits CNN: test accuracy with EMA statistics vs after recalibrate."""
    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import bnexport

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=seed, stratify=y
    )
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same")(inputs)
    h = keras.layers.ReLU()(bnexport.BatchNormalization(momentum=0.99)(h))
    h = keras.layers.Conv2D(32, 3, padding="same")(h)
    h = keras.layers.ReLU()(bnexport.BatchNormalization(momentum=0.99)(h))
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10)(bnexport.BatchNormalization(momentum=0.99)(h))
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    batches = len(x_train) // BATCH
    epochs = max(1, train_steps // batches)
    model.fit(x_train, y_train, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=True)

    def accuracy() -> float:
        return float(model.evaluate(x_test, y_test, batch_size=256, verbose=0)[1])

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digits.keras")
        model.save(path)
        result: dict[str, Any] = {
            "train_steps": epochs * batches,
            "ema_accuracy": accuracy(),
        }
        for mode in ("sequential", "parallel"):
            restored = keras.saving.load_model(path)
            model = restored
            t0 = time.perf_counter()
            report = bnexport.recalibrate(model, x_train, batch_size=BATCH, mode=mode)
            result[f"{mode}_seconds"] = time.perf_counter() - t0
            result[f"{mode}_accuracy"] = accuracy()
            result[f"{mode}_max_variance_ratio"] = max(
                r.max_variance_ratio for r in report.values()
            )
    return result


# ---------------------------------------------------------------- report
def _fmt(v: float | None, spec: str = "8.2f") -> str:
    return format(v, spec) if v is not None else "     n/a"


def print_table(rows: list[dict[str, Any]], suffix: str = "") -> None:
    """Print times and ratios (``suffix=""``: wall clock, ``"_cpu"``: process CPU time)."""
    unit = "CPU ms" if suffix else "wall ms"
    print(
        f"[{unit}] {'model':9s} {'mode':8s} {'keras':>9s} {'tf_keras':>9s} {'ours':>9s}"
        f" {'ours/best':>10s} {'ours/ours-def':>14s} {'tfk/tfk-def':>12s}"
    )
    for r in rows:
        print(
            f"{'':{len(unit) + 3}s}{r['model']:9s} {r['mode']:8s} "
            + " ".join(_fmt(r[f"{k}{suffix}"], "9.2f") for k in IMPLS)
            + f" {_fmt(r[f'ours_vs_best_peer{suffix}'], '10.2f')}"
            + f" {_fmt(r[f'ours_vs_ours_default{suffix}'], '14.2f')}"
            + f" {_fmt(r[f'tf_keras_vs_tf_keras_default{suffix}'], '12.2f')}"
        )
    for r in rows:
        if f"bn_ms{suffix}" in r:
            base = f"{r[f'keras_nobn{suffix}']:.2f} / {r[f'tf_keras_nobn{suffix}']:.2f}"
            cost = ", ".join(f"{k} {v:.2f}" for k, v in r[f"bn_ms{suffix}"].items())
            print(f"  {r['model']}: without BN keras / tf_keras {base}; time in BN: {cost}")
    print()
    for r in rows:
        best = r[f"ours_vs_best_peer{suffix}"]
        own = r[f"ours_vs_ours_default{suffix}"]
        if r["mode"] == "default" and best is not None:
            print(
                f"target ({unit}) {r['model']}: ours default <= 1.0x faster peer: {best:.2f}x "
                + ("MET" if best <= 1.0 else "MISSED")
            )
        if r["mode"] in ("renorm", "ghost") and own is not None:
            print(
                f"target ({unit}) {r['model']}: ours {r['mode']} <= 1.3x ours default: "
                f"{own:.2f}x " + ("MET" if own <= 1.3 else "MISSED")
            )
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case")
    parser.add_argument("--quick", action="store_true", help="6 timed steps, short training")
    parser.add_argument("--json", type=str, default=None, help="write results to this path")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--inter-threads", type=int, default=2, help="inter-op threads")
    parser.add_argument("--models", default="resnet,bn_heavy")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--skip-recalibration", action="store_true")
    args = parser.parse_args(argv)
    configure(args.threads, args.inter_threads)
    steps = 6 if args.quick else args.steps
    print(
        f"TensorFlow {tf.__version__}, batch {BATCH}, CPU, {steps} timed steps, "
        f"threads intra {args.threads} / inter {args.inter_threads}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    rows = run_timing(steps, args.models.split(","), args.modes.split(","))
    print_table(rows)
    print_table(rows, "_cpu")
    result: dict[str, Any] = {
        "batch": BATCH,
        "steps": steps,
        "threads": {"intra": args.threads, "inter": args.inter_threads},
        "tensorflow": tf.__version__,
        "timing": rows,
    }
    if not args.skip_recalibration:
        rec = run_recalibration(train_steps=10 if args.quick else 20)
        result["recalibration"] = rec
        print()
        print(
            f"digits CNN after {rec['train_steps']} steps (momentum 0.99): test accuracy "
            f"EMA {rec['ema_accuracy']:.3f}, recalibrate sequential "
            f"{rec['sequential_accuracy']:.3f} ({rec['sequential_seconds']:.2f}s), parallel "
            f"{rec['parallel_accuracy']:.3f} ({rec['parallel_seconds']:.2f}s)"
        )
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
