"""onnxruntime options of a served model: threads, spinning, memory arena and its shrinkage.

A server runs several batches of one model at once (``instances``) next to its event
loop, so the defaults differ from a one-off ``Session``:

- threads per run: the cores this process may use (its affinity mask, not the
  machine's count) divided by the runs that may be in flight, at least 1. Each
  onnxruntime run splits every operator over its intra-op threads and waits for the
  slowest; ``instances`` runs of ``cores`` threads each put ``instances x cores``
  threads on ``cores`` cores, and every operator then waits for a thread that the
  scheduler has put off. With ``cores // instances`` threads the runs together fill
  the cores once.
- spinning threads off (they burn the cores the event loop and the other runs need);
- the CPU arena shrunk after each run (every merged batch size is a new shape, and
  the arena otherwise keeps the largest).
"""

from __future__ import annotations

import os
from typing import Any


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask (``os.sched_getaffinity``), at least 1.

    The affinity mask, not ``os.cpu_count()``: a server pinned with ``taskset`` or a
    container's cpuset sees only its own cores.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_run(instances: int = 1, cores: int | None = None) -> int:
    """Intra-op threads of one run when ``instances`` runs share ``cores`` cores.

    ``max(1, cores // instances)``; ``cores`` defaults to :func:`available_cores`.
    """
    if cores is None:
        cores = available_cores()
    return max(1, int(cores) // max(1, int(instances)))


def ort_session_kwargs(
    backend: str,
    intra_op_threads: int,
    spinning: bool,
    memory_arena: bool = True,
    *,
    instances: int = 1,
    cores: int | None = None,
) -> dict[str, Any]:
    """``Session`` keyword arguments with the onnxruntime threading/memory the server wants.

    Args:
        backend: the server's ``--backend``; TensorRT takes none of these options.
        intra_op_threads: threads per run; 0: :func:`threads_per_run` of ``instances``
            and ``cores``.
        spinning: let idle intra-op threads spin.
        memory_arena: onnxruntime's CPU memory arena.
        instances: runs of the model that may be in flight at once (``--instances``).
        cores: the cores to share (default: :func:`available_cores`).
    """
    if backend == "tensorrt":
        return {}
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_cpu_mem_arena = memory_arena
    options.intra_op_num_threads = intra_op_threads or threads_per_run(instances, cores)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return {"session_options": options}


def ort_run_options(
    backend: str, device: str, memory_arena: bool = True, arena_shrinkage: bool = True
) -> Any:
    """An ``onnxruntime.RunOptions`` that shrinks the CPU memory arena after every run.

    With dynamic batching every merged batch size is a new shape, and onnxruntime's
    CPU arena keeps each region it grows to for the life of the session, in steps as
    new sizes arrive. The run config entry ``memory.enable_memory_arena_shrinkage``
    (``"cpu:0"``) returns the arena's free regions at the end of each run, so the
    memory held between batches is bounded by one batch.

    Returns:
        the ``RunOptions``, or ``None`` when there is nothing to shrink: TensorRT
        backend, arena off or shrinkage not wanted.
    """
    from bnexport.runtime.session import resolve_backend

    if not (memory_arena and arena_shrinkage) or resolve_backend(backend, device) == "tensorrt":
        return None
    import onnxruntime

    options = onnxruntime.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options
