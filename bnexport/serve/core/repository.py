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

Model files stay inside their model folder: ``default_model_filename`` must be
a plain file name, and a model file (or a link) that resolves outside
``<model>/`` is refused.

The repository remembers where it was loaded from, so one model can be read
again from disk (:meth:`ModelRepository.read_model`) and swapped in while the
others keep serving (:meth:`ModelRepository.swap`); see
:mod:`bnexport.serve.core.model_control` for the load/unload protocol.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnexport.errors import InputError, UsageError
from bnexport.runtime.io_check import check_inputs
from bnexport.serve.core.statistics import ModelStats
from bnexport.serve.protocol.codec import datatype_of
from bnexport.serve.protocol.errors import BadRequestError, ModelNotFoundError
from bnexport.serve.protocol.types import MetadataTensor, ModelMetadataResponse, RequestOutput
from bnexport.serve.triton.config import check_model_name

#: ``session_factory(path, **session_kwargs) -> Session-like`` (has inputs/outputs/run)
SessionFactory = Callable[..., Any]

_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}


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
            (see :func:`~bnexport.serve.core.session_options.ort_run_options`); ``None``:
            none passed.
        stats: Triton statistics of this version (see :mod:`bnexport.serve.core.statistics`).
    """

    name: str
    version: str
    path: Path
    session: Any
    max_batch: int
    batch_timeout_s: float
    run_options: Any = None
    stats: ModelStats = dataclasses.field(default_factory=ModelStats)

    def __post_init__(self) -> None:
        self.inputs = list(self.session.inputs)
        self.outputs = list(self.session.outputs)
        self._output_names = {o.name for o in self.outputs}

        def batched(t: Any) -> bool:
            return t.shape is not None and len(t.shape) >= 1 and t.shape[0] is None

        self.batchable = all(map(batched, self.inputs)) and all(map(batched, self.outputs))
        if not self.batchable:
            self.max_batch = 1
        backend = getattr(self.session, "backend", "onnxruntime")
        self.platform = _PLATFORMS.get(backend, str(backend))

    def metadata(self, versions: Sequence[str]) -> ModelMetadataResponse:
        """KServe model metadata; dynamic dimensions are ``-1``."""

        def tensor(t: Any) -> MetadataTensor:
            shape = [-1 if d is None else int(d) for d in (t.shape or ())]
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
        serving, so requests of new batch sizes add little memory. Skipped
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

        The names, ranks and fixed dimensions are checked by the project's one input
        validator, :func:`bnexport.runtime.io_check.check_inputs`, without casting
        (``cast=False``): a request states its datatype, and one that differs from
        the model's is refused, as Triton does. Every input of a batchable model
        must also have the same first dimension.

        Raises:
            BadRequestError: names the model, the input and what the model expects.
        """
        try:
            check_inputs(inputs, self.inputs, cast=False)
        except InputError as exc:
            raise BadRequestError(f"model '{self.name}': {exc}") from None
        rows = {arr.shape[0] for arr in inputs.values() if arr.ndim}
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


@dataclasses.dataclass
class _Source:
    """Where a repository was loaded from and how, to read one model again."""

    root: Path
    defaults: ModelSettings
    session_kwargs: dict[str, Any]
    factory: SessionFactory
    run_options: Any = None


class ModelRepository:
    """Every served model and version; ``get(name, version)`` finds one.

    Attributes:
        control_mode: ``"none"`` or ``"explicit"`` (see :mod:`bnexport.serve.core.model_control`).
        control_lock: held by a load or unload.
        warmup: run each model read by :meth:`read_model` on zero batches first.
        merged_run_options: ``RunOptions`` given to every model whose requests are merged
            (``max_batch > 1``), now and when read again (see :meth:`set_run_options`).
    """

    def __init__(
        self, models: Mapping[str, Mapping[str, ServedModel]], *, source: _Source | None = None
    ) -> None:
        self._models = {name: _sorted(vs) for name, vs in models.items()}
        self._source = source
        self.warmup = False
        self.merged_run_options: Any = None
        self.control_mode = "none"
        self.control_lock = asyncio.Lock()  # one load/unload at a time

    def set_run_options(self, run_options: Any) -> None:
        """Give ``run_options`` to every model whose requests are merged, now and on reload.

        Only merged models see varying batch sizes, so only they need the arena
        shrinkage that ``run_options`` carries; a model run at one fixed size keeps
        its arena (see :func:`bnexport.serve.core.session_options.ort_run_options`).
        """
        self.merged_run_options = run_options
        for model in self.all():
            if model.max_batch > 1:
                model.run_options = run_options

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
        source = _Source(root, defaults, dict(session_kwargs or {}), session_factory, run_options)
        if root.is_file():
            if root.suffix != ".onnx":
                raise UsageError(f"expected an .onnx file or a repository folder: {root}")
            name = check_model_name(root.stem, root)
            return cls({name: _read_versions(source, name)}, source=source)
        if not root.is_dir():
            raise FileNotFoundError(f"model or repository not found: {root}")
        models: dict[str, dict[str, ServedModel]] = {}
        for name in _names_on_disk(root):
            found = _read_versions(source, name)
            if found:
                models[name] = found
        if not models:
            raise UsageError(
                f"no model found in {root}: expected <model>/<version>/model.onnx folders"
            )
        return cls(models, source=source)

    # -- model control ----------------------------------------------------------------------------
    def names_on_disk(self) -> list[str]:
        """Every model name the source holds (loaded or not), sorted."""
        if self._source is None:
            return self.names()
        root = self._source.root
        return [root.stem] if root.is_file() else _names_on_disk(root)

    def read_model(self, name: str) -> dict[str, ServedModel]:
        """Read every version of ``name`` from the source again, warmed up (blocking).

        The new versions are not served until :meth:`swap` puts them in.

        Raises:
            ModelNotFoundError: the source holds no model ``name``.
            UsageError: its config or files are invalid (named in the message).
        """
        if self._source is None:
            raise ModelNotFoundError(f"model '{name}': the repository cannot be read again")
        on_disk = self.names_on_disk()
        if name not in on_disk:
            raise ModelNotFoundError(
                f"no model '{name}' in {self._source.root}; models there: {on_disk}"
            )
        models = _read_versions(self._source, name)
        if not models:
            raise ModelNotFoundError(f"model '{name}' has no version with a model file")
        for model in models.values():
            if model.max_batch > 1 and self.merged_run_options is not None:
                model.run_options = self.merged_run_options
            if self.warmup:
                model.warmup()
        return models

    def swap(self, name: str, versions: Mapping[str, ServedModel] | None) -> dict[str, ServedModel]:
        """Serve ``versions`` as model ``name`` (``None``: unload it); return the old versions.

        Not thread-safe: call it on the event loop, where requests look models up.
        """
        old = self._models.pop(name, {})
        if versions:
            self._models[name] = _sorted(versions)
        return old

    def index(self) -> list[dict[str, str]]:
        """Triton's repository index: ``{name, version, state, reason}`` per model version.

        Loaded versions are ``READY``; a model of the source that is not loaded is
        ``UNAVAILABLE`` with reason ``unloaded`` (and no version).
        """
        rows = []
        for name in sorted(set(self.names_on_disk()) | set(self._models)):
            versions = self._models.get(name)
            if versions:
                rows += [
                    {"name": name, "version": v, "state": "READY", "reason": ""} for v in versions
                ]
            else:
                rows.append(
                    {"name": name, "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}
                )
        return rows

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


def _sorted(versions: Mapping[str, ServedModel]) -> dict[str, ServedModel]:
    return dict(sorted(versions.items(), key=lambda kv: int(kv[0])))


def _names_on_disk(root: Path) -> list[str]:
    """Model folder names under a repository root (hidden folders skipped), validated."""
    return [
        check_model_name(d.name, d)
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    ]


def _read_versions(source: _Source, name: str) -> dict[str, ServedModel]:
    """Every version of model ``name`` of ``source`` as loaded sessions (blocking)."""
    root, kw = source.root, source.session_kwargs
    if root.is_file():
        return {
            "1": _load(name, "1", root, source.defaults, kw, source.factory, source.run_options)
        }
    model_dir = root / name
    settings = _read_config(model_dir, source.defaults)
    return {
        str(v): _load(name, str(v), f, settings, kw, source.factory, source.run_options)
        for v, f in _find_versions(model_dir, settings).items()
    }


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
            f = _model_file(sub, settings.model_filename, model_dir)
            if f is not None:
                found[int(sub.name)] = f
    if not found:
        f = _model_file(model_dir, settings.model_filename, model_dir)
        if f is not None:
            found[1] = f
    if settings.versions is not None:
        keep = set(settings.versions(sorted(found)))
        found = {v: f for v, f in found.items() if v in keep}
    return dict(sorted(found.items()))


def _model_file(folder: Path, filename: str | None, model_dir: Path) -> Path | None:
    """The model file of a version ``folder``, confined to ``model_dir``; ``None`` if absent."""
    if filename:
        f = folder / filename
        return _confined(f, model_dir) if f.is_file() else None
    default = folder / "model.onnx"
    if default.is_file():
        return _confined(default, model_dir)
    onnx_files = sorted(folder.glob("*.onnx"))
    if len(onnx_files) > 1:
        raise UsageError(
            f"{folder} holds several .onnx files {[p.name for p in onnx_files]}; "
            "name one model.onnx or set default_model_filename in config.pbtxt"
        )
    return _confined(onnx_files[0], model_dir) if onnx_files else None


def _confined(path: Path, model_dir: Path) -> Path:
    """``path`` when it resolves (links followed) inside ``model_dir``, else ``UsageError``."""
    real, home = path.resolve(), model_dir.resolve()
    if not real.is_relative_to(home):
        raise UsageError(
            f"model file {path} resolves to {real}, outside its model folder {home}; "
            "model files must stay inside <repository>/<model>/"
        )
    return path


def _check_filename(value: str, cfg_path: Path) -> str:
    """``default_model_filename`` must be a plain file name (no folder, no '..')."""
    if value in (".", "..") or any(sep in value for sep in ("/", "\\", "\0")):
        raise UsageError(
            f"{cfg_path}: default_model_filename {value!r} must be a file name inside the "
            "version folder (no '/', '\\' or '..')"
        )
    return value


def _read_config(model_dir: Path, defaults: ModelSettings) -> ModelSettings:
    """Apply ``<model>/config.pbtxt`` (if any) over the server defaults."""
    cfg_path = model_dir / "config.pbtxt"
    if not cfg_path.is_file():
        return dataclasses.replace(defaults)
    from bnexport.serve.triton.config import parse_config

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
        settings.model_filename = _check_filename(cfg.default_model_filename, cfg_path)
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
