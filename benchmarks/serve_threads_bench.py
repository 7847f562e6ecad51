"""In process: how the runs of a served model should share the cores (threads, runs, arena).

The server's throughput at many clients is bounded by the model runs once the batcher
keeps them busy (``serve_bench.py``'s server metrics show run time ~ wall time for
ResNet50 at 32 clients), so this script times the runs alone, without HTTP, for each
way of running ``B`` images that the server's settings allow:

=================  ==============================================================
``1run-Tthr``      one run of the ``B`` images, ``T`` = the cores (``--instances 1``)
``Krun-1thr``      ``K`` = the cores concurrent runs of ``B/K`` images, 1 thread each
                   (``--instances K``: the default threads per run ``cores // K``);
                   ``min(B, K)`` runs when ``B < K`` (an image is not split)
``Krun-Tthr``      the same ``K`` runs, ``T`` threads each: ``K x T`` threads on ``T``
                   cores (``--instances K`` before the threads-per-run rule)
``1run-noshrink``  ``1run-Tthr`` without arena shrinkage (``--no-arena-shrinkage``)
=================  ==============================================================

Each configuration has its own sessions (each thread its own, as model instances
would); they run in interleaved rounds, and each is reported as the median time per
image and the median of its per-round ratio to ``1run-Tthr`` (the server's default),
so that a change of the shared machine's load hits all alike. ``--burn N`` adds ``N``
busy processes (a machine shared with other work): there, more runnable threads also
take a larger share of the cores from the other processes, which a ratio above 1 may
reflect rather than a better use of the cores. The cores are the process's
affinity mask (``os.sched_getaffinity``); ``--cores`` overrides it.

Example::

    python benchmarks/serve_threads_bench.py --batch 1,16 --rounds 8 \\
        --json benchmarks/results/serve_threads.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _shrink():
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def _burn(stop) -> None:
    while not stop.is_set():
        pass


def _run_all(sessions, name: str, x: np.ndarray, run_options) -> float:
    """Run ``x`` split evenly over ``sessions`` (one thread each); wall seconds."""
    parts = np.array_split(x, len(sessions))
    if len(sessions) == 1:
        t0 = time.perf_counter()
        sessions[0].run(None, {name: x}, run_options)
        return time.perf_counter() - t0
    threads = [
        threading.Thread(target=s.run, args=(None, {name: p}, run_options))
        for s, p in zip(sessions, parts, strict=True)
        if len(p)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def bench(path: str, batches: list[int], rounds: int, cores: int) -> list[dict]:
    probe = _session(path, 1)
    name = probe.get_inputs()[0].name
    shape = [d if isinstance(d, int) else 1 for d in probe.get_inputs()[0].shape[1:]]
    del probe
    shrink = _shrink()
    k, over = max(2, cores), max(2, cores)  # runs at once; threads of each when oversubscribed
    configs = {
        f"1run-{cores}thr": ([_session(path, cores)], shrink),
        f"{k}run-1thr": ([_session(path, 1) for _ in range(k)], shrink),
        f"{k}run-{over}thr": ([_session(path, over) for _ in range(k)], shrink),
        "1run-noshrink": ([_session(path, cores)], None),
    }
    base = f"1run-{cores}thr"
    rows = []
    for b in batches:
        x = np.random.default_rng(0).uniform(0, 1, (b, *shape)).astype(np.float32)
        for sessions, ro in configs.values():  # warm-up: this shape's memory pattern
            _run_all(sessions, name, x, ro)
            _run_all(sessions, name, x, ro)
        times: dict[str, list[float]] = {c: [] for c in configs}
        for r in range(rounds):
            order = list(configs)
            order = order[r % len(order) :] + order[: r % len(order)]
            for c in order:
                sessions, ro = configs[c]
                times[c].append(_run_all(sessions, name, x, ro) / b * 1000)
        ref = np.array(times[base])
        for c, t in times.items():
            t = np.array(t)
            row = {
                "batch": b,
                "config": c,
                "ms_per_image_median": float(np.median(t)),
                "ms_per_image_min": float(t.min()),
                "ratio_to_default_median": float(np.median(ref / t)),
                "rounds": rounds,
            }
            rows.append(row)
            print(
                f"batch {b:<4} {c:<16} {row['ms_per_image_median']:8.2f} ms/image (min "
                f"{row['ms_per_image_min']:.2f})  speed vs {base}: "
                f"{row['ratio_to_default_median']:.2f}x",
                flush=True,
            )
    return rows


def main() -> int:
    from export_bench import cpu_description, print_cpu
    from serve_bench import resnet50_onnx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="ONNX file (default: ResNet50, cached)")
    parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--cores", type=int, default=None, help="default: the affinity mask")
    parser.add_argument("--burn", type=int, default=0, help="busy processes beside the runs")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    from bnexport.serve.core.session_options import available_cores

    cores = args.cores or available_cores()
    path = args.model or str(resnet50_onnx())
    cpu = cpu_description()
    print_cpu(cpu)
    print(f"model {path}, {cores} cores, {args.burn} busy processes beside", flush=True)
    stop = mp.Event()
    burners = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(args.burn)]
    for p in burners:
        p.start()
    try:
        rows = bench(path, [int(b) for b in args.batch.split(",")], args.rounds, cores)
    finally:
        stop.set()
        for p in burners:
            p.join()
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({"cpu": cpu, "cores": cores, "burn": args.burn, "rows": rows}))
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
