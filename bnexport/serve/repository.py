"""The model repository: which models the server serves, loaded through ``Session``.

Two layouts are accepted:

- a single ``MODEL.onnx``: served as model ``MODEL`` (the file stem), version ``1``;
- a directory laid out like a Triton model repository::

      REPO_DIR/
        <model>/
          config.pbtxt          # optional, Triton model config
          <version>/model.onnx  # version: a positive integer
          ...

  (a ``<model>/`` holding ``*.onnx`` directly, with no version folder, is version 1).

From an optional ``config.pbtxt`` the server reads ``max_batch_size`` (0: the
model takes no batch dimension, so requests are never merged),
``dynamic_batching`` (absent: requests run one by one, as in Triton;
``max_queue_delay_microseconds`` overrides ``--batch-timeout-ms``),
``default_model_filename`` and ``version_policy`` (``all`` / ``latest`` /
``specific``). Without a config every version found is served and requests
without a version go to the highest one.

A model is *batchable* when every input and output has a dynamic first
dimension; only batchable models have their requests merged.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnexport.errors import UsageError
from bnexport.serve.codec import datatype_of
from bnexport.serve.errors import BadRequestError, ModelNotFoundError
from bnexport.serve.protocol import MetadataTensor, ModelMetadataResponse, RequestOutput

#: ``session_factory(path, **session_kwargs) -> Session-like`` (has inputs/outputs/run)
SessionFactory = Callable[..., Any]

_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def default_session_factory(path: str, **kwargs: Any) -> Any:
    """Build a :class:`bnexport.runtime.session.Session` (imported on first use)."""
    from bnexport.runtime.session import Session

    return Session(path, **kwargs)


@dataclasses.dataclass
class ModelSettings:
    """Per-model serving settings resolved from the CLI and an optional config.pbtxt.

    Attributes:
        max_batch: largest merged batch (rows along dim 0); ``<= 1`` disables merging.
        batch_timeout_s: how long the batcher waits for more requests after the first.
        versions: version policy, ``None`` for all versions found.
        model_filename: file name inside each version folder, ``None`` to discover.
    """

    max_batch: int
    batch_timeout_s: float
    versions: Callable[[list[int]], list[int]] | None = None
    model_filename: str | None = None


@dataclasses.dataclass
class ServedModel:
    """One loaded version of one model.

    Attributes:
        name: model name in URLs.
        version: version string in URLs.
        path: the ONNX file.
        session: the object that runs it (``bnexport.Session``).
        max_batch: largest merged batch; 1 when requests are never merged.
        batch_timeout_s: batcher wait after the first request of a batch.
        run_options: an ``onnxruntime.RunOptions`` passed to every ``session.run``
            (see :func:`bnexport.serve.server.ort_run_options`); ``None``: none passed.
    """

    name: str
    version: str
    path: Path
    session: Any
    max_batch: int
    batch_timeout_s: float
    run_options: Any = None

    def __post_init__(self) -> None:
        self.inputs = list(self.session.inputs)
        self.outputs = list(self.session.outputs)
        self._input_by_name = {i.name: i for i in self.inputs}
        self._output_names = {o.name for o in self.outputs}
        self.batchable = all(len(t.shape) >= 1 and t.shape[0] is None for t in self.inputs) and all(
            len(t.shape) >= 1 and t.shape[0] is None for t in self.outputs
        )
        if not self.batchable:
            self.max_batch = 1
        backend = getattr(self.session, "backend", "onnxruntime")
        self.platform = _PLATFORMS.get(backend, str(backend))

    def metadata(self, versions: Sequence[str]) -> ModelMetadataResponse:
        """KServe model metadata; dynamic dimensions are ``-1``."""

        def tensor(t: Any) -> MetadataTensor:
            shape = [-1 if d is None else int(d) for d in t.shape]
            return MetadataTensor(name=t.name, datatype=datatype_of(t.dtype), shape=shape)

        return ModelMetadataResponse(
            name=self.name,
            versions=list(versions),
            platform=self.platform,
            inputs=[tensor(t) for t in self.inputs],
            outputs=[tensor(t) for t in self.outputs],
        )

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on one (merged) batch, with :attr:`run_options` when set."""
        if self.run_options is None:
            return self.session.run(feed)
        return self.session.run(feed, run_options=self.run_options)

    def warmup_batch_sizes(self) -> list[int]:
        """Batch sizes of the warm-up runs: ``max_batch`` halved down to 1, each twice.

        Empty for a model that is not batchable (it is warmed up twice on its own shape).
        """
        if not self.batchable:
            return []
        sizes, b = [], self.max_batch
        while b >= 1:
            sizes += [b, b]
            b //= 2
        return sizes

    def warmup(self) -> bool:
        """Run the model on zeros at the batch sizes of :meth:`warmup_batch_sizes`.

        Largest first, so that onnxruntime's memory arena and kernel caches reach
        their final size before the first request. Each size twice: onnxruntime plans
        a shape's memory pattern on its first run and allocates it as one block from
        the second run on. Smaller sizes too: the per-shape state that the arena does
        not hold (thread-local packing buffers, memory patterns) then exists before
        serving. Measured on ResNet50 in process, 60 random batch sizes 1..32 after
        warm-up, arena shrinkage on: RSS +11.6 % after one batch-32 run, +0.3 % after
        this warm-up (without shrinkage: +56 % after one run, +5.8 %). Skipped
        (``False``) when a non-batch dimension is dynamic (no shape to guess) or an
        input is not numeric.
        """
        for info in self.inputs:
            dims = list(info.shape)[1:] if self.batchable else list(info.shape)
            if any(d is None for d in dims) or np.dtype(info.dtype).kind not in "biuf":
                return False
        for size in self.warmup_batch_sizes() or [0, 0]:  # 0: the fixed model's own shape
            feed = {}
            for info in self.inputs:
                dims = [size, *info.shape[1:]] if self.batchable else list(info.shape)
                feed[info.name] = np.zeros(dims, dtype=info.dtype)
            self.run(feed)
        return True

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> int | None:
        """Validate request tensors against the model; return their batch size.

        Datatypes must match exactly; fixed dimensions must match; every input of
        a batchable model must have the same first dimension.

        Raises:
            BadRequestError: names the input and what the model expects.
        """
        unknown = [n for n in inputs if n not in self._input_by_name]
        if unknown:
            raise BadRequestError(
                f"model '{self.name}': unknown input(s) {unknown}; "
                f"expected {[i.name for i in self.inputs]}"
            )
        missing = [i.name for i in self.inputs if i.name not in inputs]
        if missing:
            raise BadRequestError(f"model '{self.name}': missing input(s) {missing}")
        rows: set[int] = set()
        for info in self.inputs:
            arr = inputs[info.name]
            want = np.dtype(info.dtype)
            if arr.dtype != want and not (want.kind in "SUO" and arr.dtype == np.object_):
                raise BadRequestError(
                    f"model '{self.name}': input '{info.name}' has datatype "
                    f"{datatype_of(arr.dtype)}, expected {datatype_of(want)}"
                )
            expected = [-1 if d is None else int(d) for d in info.shape]
            if arr.ndim != len(info.shape) or any(
                d is not None and d != s for d, s in zip(info.shape, arr.shape, strict=True)
            ):
                raise BadRequestError(
                    f"model '{self.name}': input '{info.name}' has shape {list(arr.shape)}, "
                    f"expected {expected}"
                )
            if arr.ndim:
                rows.add(arr.shape[0])
        if self.batchable:
            if len(rows) > 1:
                raise BadRequestError(
                    f"model '{self.name}': inputs disagree on the batch dimension {sorted(rows)}"
                )
            return rows.pop() if rows else None
        return None

    def check_outputs(self, requested: Sequence[RequestOutput] | None) -> None:
        """Raise ``BadRequestError`` for an unknown or unsupported requested output."""
        for out in requested or ():
            if out.name not in self._output_names:
                raise BadRequestError(
                    f"model '{self.name}': unknown output '{out.name}'; "
                    f"expected one of {sorted(self._output_names)}"
                )
            if out.parameters and out.parameters.get("classification"):
                raise BadRequestError(
                    f"output '{out.name}': the classification extension is not supported"
                )


class ModelRepository:
    """Every served model and version; ``get(name, version)`` finds one."""

    def __init__(self, models: Mapping[str, Mapping[str, ServedModel]]) -> None:
        self._models = {
            name: dict(sorted(vs.items(), key=lambda kv: int(kv[0]))) for name, vs in models.items()
        }

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        *,
        max_batch: int = 32,
        batch_timeout_ms: float = 2.0,
        session_kwargs: Mapping[str, Any] | None = None,
        session_factory: SessionFactory = default_session_factory,
        run_options: Any = None,
    ) -> ModelRepository:
        """Load a single ``.onnx`` file or a Triton-style repository directory.

        Args:
            path: ``MODEL.onnx`` or ``REPO_DIR``.
            max_batch: default largest merged batch (``--max-batch``).
            batch_timeout_ms: default batcher wait (``--batch-timeout-ms``).
            session_kwargs: ``backend``, ``device``, ``precision`` for every Session.
            session_factory: builds the runner of one ONNX file.
            run_options: passed to every ``Session.run`` of every model (onnxruntime
                ``RunOptions``); ``None``: none.

        Raises:
            UsageError: the path holds no model, a name or version is invalid.
        """
        root = Path(path)
        defaults = ModelSettings(max_batch=max_batch, batch_timeout_s=batch_timeout_ms / 1000.0)
        kwargs = dict(session_kwargs or {})
        if root.is_file():
            if root.suffix != ".onnx":
                raise UsageError(f"expected an .onnx file or a repository folder: {root}")
            name = _check_name(root.stem, root)
            model = _load(name, "1", root, defaults, kwargs, session_factory, run_options)
            return cls({name: {"1": model}})
        if not root.is_dir():
            raise FileNotFoundError(f"model or repository not found: {root}")
        models: dict[str, dict[str, ServedModel]] = {}
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            if model_dir.name.startswith("."):
                continue
            name = _check_name(model_dir.name, model_dir)
            settings = _read_config(model_dir, defaults)
            found = _find_versions(model_dir, settings)
            if not found:
                continue
            models[name] = {
                str(v): _load(name, str(v), f, settings, kwargs, session_factory, run_options)
                for v, f in found.items()
            }
        if not models:
            raise UsageError(
                f"no model found in {root}: expected <model>/<version>/model.onnx folders"
            )
        return cls(models)

    def names(self) -> list[str]:
        """Model names, sorted."""
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        """Versions of ``name``, ascending."""
        return list(self._get_versions(name))

    def all(self) -> list[ServedModel]:
        """Every loaded model version."""
        return [m for vs in self._models.values() for m in vs.values()]

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The model ``name`` at ``version`` (the highest when ``None``/empty).

        Raises:
            ModelNotFoundError: unknown model or version (404).
        """
        versions = self._get_versions(name)
        if not version:
            return next(reversed(versions.values()))
        try:
            return versions[version]
        except KeyError:
            raise ModelNotFoundError(
                f"model '{name}' has no version '{version}'; versions: {list(versions)}"
            ) from None

    def _get_versions(self, name: str) -> dict[str, ServedModel]:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(
                f"unknown model '{name}'; served models: {self.names()}"
            ) from None


def _check_name(name: str, where: Path) -> str:
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise UsageError(
            f"model name {name!r} ({where}) may only use letters, digits, '_.-' "
            "and may not be '.' or '..'"
        )
    return name


def _load(
    name: str,
    version: str,
    path: Path,
    settings: ModelSettings,
    kwargs: dict[str, Any],
    factory: SessionFactory,
    run_options: Any = None,
) -> ServedModel:
    session_max = settings.max_batch if settings.max_batch > 1 else None
    session = factory(str(path), max_batch=session_max, **kwargs)
    return ServedModel(
        name=name,
        version=version,
        path=path,
        session=session,
        max_batch=max(1, settings.max_batch),
        batch_timeout_s=settings.batch_timeout_s,
        run_options=run_options,
    )


def _find_versions(model_dir: Path, settings: ModelSettings) -> dict[int, Path]:
    """``{version: onnx file}`` under ``model_dir`` after the version policy."""
    found: dict[int, Path] = {}
    for sub in model_dir.iterdir():
        if sub.is_dir() and sub.name.isdigit() and int(sub.name) > 0:
            f = _model_file(sub, settings.model_filename)
            if f is not None:
                found[int(sub.name)] = f
    if not found:
        f = _model_file(model_dir, settings.model_filename)
        if f is not None:
            found[1] = f
    if settings.versions is not None:
        keep = set(settings.versions(sorted(found)))
        found = {v: f for v, f in found.items() if v in keep}
    return dict(sorted(found.items()))


def _model_file(folder: Path, filename: str | None) -> Path | None:
    if filename:
        f = folder / filename
        return f if f.is_file() else None
    default = folder / "model.onnx"
    if default.is_file():
        return default
    onnx_files = sorted(folder.glob("*.onnx"))
    if len(onnx_files) > 1:
        raise UsageError(
            f"{folder} holds several .onnx files {[p.name for p in onnx_files]}; "
            "name one model.onnx or set default_model_filename in config.pbtxt"
        )
    return onnx_files[0] if onnx_files else None


def _read_config(model_dir: Path, defaults: ModelSettings) -> ModelSettings:
    """Apply ``<model>/config.pbtxt`` (if any) over the server defaults."""
    cfg_path = model_dir / "config.pbtxt"
    if not cfg_path.is_file():
        return dataclasses.replace(defaults)
    from bnexport.serve.triton_repo import parse_config

    cfg = parse_config(cfg_path.read_text())
    settings = dataclasses.replace(defaults)
    if cfg.max_batch_size <= 0 or not cfg.HasField("dynamic_batching"):
        settings.max_batch = 1
    else:
        settings.max_batch = min(defaults.max_batch, cfg.max_batch_size)
        delay = cfg.dynamic_batching.max_queue_delay_microseconds
        if delay:
            settings.batch_timeout_s = delay / 1e6
    if cfg.default_model_filename:
        settings.model_filename = cfg.default_model_filename
    if cfg.HasField("version_policy"):
        policy = cfg.version_policy
        kind = policy.WhichOneof("policy_choice")
        if kind == "latest":
            n = max(1, policy.latest.num_versions)
            settings.versions = lambda vs: vs[-n:]
        elif kind == "specific":
            wanted = set(policy.specific.versions)
            settings.versions = lambda vs: [v for v in vs if v in wanted]
    return settings
