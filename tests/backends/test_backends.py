"""bnexport on the JAX and torch Keras backends: export without TensorFlow.

Two kinds of check:

- default run (TensorFlow backend, the project venv): every module of the export path
  (``bnexport.export`` with ``passes`` and the emitter, ``bnexport.io``) imports with
  TensorFlow, tf2onnx and tf-keras made unimportable; the verification's reference run and
  the ``.keras`` loader work for a Keras 3 model without them; a ``.keras`` file holding
  bnexport's TensorFlow-only layers is refused on another backend with one line naming
  them. Where a JAX venv already exists (built by the slow test) the export modules are
  also imported there with ``KERAS_BACKEND=jax``.
- ``@slow``, ``jax_backend`` / ``torch_backend``: a venv with bnexport, Keras and the
  backend and no TensorFlow (:mod:`backend_venv`); there :mod:`backend_check` exports
  MobileNetV2 and ResNet50 (96x96) through ``bnexport.export`` with the Keras-native
  engine, verifies them, checks the written files against Keras's own forward pass
  (float32: ``max|onnx − keras| <= 1e-4·max|keras| + 1e-5``, onnxruntime optimizations
  off, other inputs than the exporter's), exports MobileNetV2 again from a ``.keras``
  file through the API and the CLI, and asserts that TensorFlow was never imported.
  Skipped, with the reason, where the venv cannot be built (no package index).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from backend_venv import VenvUnavailable, default_venv, ensure_venv, python_of

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HEAVY = ("tensorflow", "tf2onnx", "tf_keras")
#: the packages whose every module must import without TensorFlow
EXPORT_PACKAGES = ("bnexport.export", "bnexport.io")

#: a fresh interpreter's preamble: the names in ``__BLOCK__`` cannot be imported
BLOCKER = textwrap.dedent(
    """
    import importlib, importlib.abc, json, pkgutil, sys
    BLOCK = __BLOCK__

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCK:
                raise ModuleNotFoundError(f"BLOCKED {name}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    """
)

#: import every module of the packages in ``__PACKAGES__``; print what failed, as JSON
IMPORT_ALL = textwrap.dedent(
    """
    failed, needs_keras, done = {}, [], []
    for package in __PACKAGES__:
        root = importlib.import_module(package)
        names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
        for name in names:
            try:
                importlib.import_module(name)
                done.append(name)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.split(".")[0] == "keras" and "keras" in BLOCK:
                    needs_keras.append(name)
                else:
                    failed[name] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                failed[name] = f"{type(exc).__name__}: {exc}"
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "tf2onnx", "tf_keras"})
    print(json.dumps({"failed": failed, "needs_keras": needs_keras, "done": done, "heavy": heavy}))
    """
)


def _script(blocked: tuple[str, ...], body: str = IMPORT_ALL) -> str:
    return BLOCKER.replace("__BLOCK__", repr(blocked)) + body.replace(
        "__PACKAGES__", repr(EXPORT_PACKAGES)
    )


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_python(python, code: str, env: dict | None = None, cwd=None) -> dict:
    proc = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        cwd=cwd or ROOT,
    )
    return _last_json(proc)


def test_export_modules_import_without_tensorflow():
    """Every module of the export path imports with TF, tf2onnx and tf-keras unimportable.

    Keras is blocked too (on this venv's TensorFlow backend importing it imports TF):
    modules that need Keras itself are listed apart and must not fail for another reason.
    """
    code = _script((*HEAVY, "keras"))
    result = _run_python(sys.executable, code)
    assert result["failed"] == {}
    assert result["heavy"] == []
    for module in ("bnexport.export.verify", "bnexport.export.loaders", "bnexport.io.keras_file"):
        assert module in result["done"]


def test_reference_run_of_a_keras_model_needs_no_tensorflow():
    """``verify.run_reference`` flattens a Keras 3 model's outputs without ``tf.nest``.

    Fails on the code that imported TensorFlow for it: on JAX/torch there is none. The
    model here is a stand-in that returns NumPy arrays in a dict (outputs in sorted-key
    order, as ``model.outputs`` lists them), run with TF and Keras unimportable.
    """
    code = _script((*HEAVY, "keras"), "") + textwrap.dedent(
        """
        import numpy as np
        from bnexport.export.loaders import KIND_KERAS, LoadedModel, TensorInfo
        from bnexport.export.verify import run_reference

        class Model:
            layers = []
            def __call__(self, x, training=None):
                assert training is False
                return {"b": x * 2.0, "a": [x + 1.0]}

        loaded = LoadedModel(
            kind=KIND_KERAS, model=Model(), inputs=[TensorInfo("x", [None, 3], "float32")],
            outputs=[TensorInfo("a", [None, 3], "float32"), TensorInfo("b", [None, 3], "float32")],
        )
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        out = run_reference(loaded, {"x": x})
        heavy = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCK))
        print(json.dumps({"a": out["a"].tolist(), "b": out["b"].tolist(), "heavy": heavy}))
        """
    )
    result = _run_python(sys.executable, code)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(result["a"], x + 1.0)
    np.testing.assert_array_equal(result["b"], x * 2.0)
    assert result["heavy"] == []


def test_keras_file_with_bnexport_layers_refused_on_other_backends(tmp_path, monkeypatch):
    """On JAX/torch a ``.keras`` file with bnexport's (TF-only) BN layer: one line, named.

    Without the check Keras imports the layer's module (TensorFlow with it) or answers
    "Could not locate class"; with it the error names the layer and the way out.
    """
    import keras

    import bnexport
    from bnexport.errors import BackendUnavailableError
    from bnexport.export import loaders

    inp = keras.Input((4,), name="x")
    out = bnexport.BatchNormalization(name="my_bn")(keras.layers.Dense(3, name="fc")(inp))
    path = tmp_path / "m.keras"
    keras.Model(inp, out).save(path)
    monkeypatch.setattr(loaders, "keras_backend", lambda: "jax")
    with pytest.raises(BackendUnavailableError) as info:
        loaders.load_model(path)
    message = str(info.value)
    assert "'my_bn (BatchNormalization)'" in message or "my_bn (BatchNormalization)" in message
    assert "KERAS_BACKEND=tensorflow" in message and "jax" in message
    assert "\n" not in message
    monkeypatch.setattr(loaders, "keras_backend", lambda: "tensorflow")
    assert (
        loaders.load_model(path)
        .model.get_layer("my_bn")
        .__class__.__module__.startswith("bnexport.")
    )


def test_keras_file_loads_without_tf_keras_scope(tmp_path, monkeypatch):
    """A ``.keras`` file never enters tf-keras's safe-mode scope (its import imports TF)."""
    import keras

    from bnexport.export import loaders

    scopes = []
    original = loaders._safe_mode_scopes

    def spy(safe_mode, *, legacy=True):
        scopes.append(legacy)
        return original(safe_mode, legacy=legacy)

    monkeypatch.setattr(loaders, "_safe_mode_scopes", spy)
    inp = keras.Input((4,), name="x")
    path = tmp_path / "plain.keras"
    keras.Model(inp, keras.layers.Dense(2)(inp)).save(path)
    loaders.load_model(path)
    assert scopes == [False]


def test_export_modules_import_on_jax_where_a_jax_venv_exists():
    """The export modules under ``KERAS_BACKEND=jax`` (Keras importable) pull in no TF.

    Runs where JAX is installed in this venv, or where the slow JAX test already built
    its venv (:func:`backend_venv.default_venv`); skipped otherwise.
    """
    try:
        import jax  # noqa: F401

        python = sys.executable
    except ImportError:
        if not python_of(default_venv("jax")).exists():
            pytest.skip("JAX is not installed and no JAX venv was built (pytest -m jax_backend)")
        try:
            python = ensure_venv("jax")
        except VenvUnavailable as exc:
            pytest.skip(f"JAX venv unusable: {exc}")
    code = _script(HEAVY)
    code += "\nimport keras; assert keras.config.backend() == 'jax'"
    result = _run_python(python, code, env={"KERAS_BACKEND": "jax"}, cwd=HERE)
    assert result["failed"] == {}
    assert result["heavy"] == []


def _backend_python(backend: str) -> Path:
    try:
        return ensure_venv(backend)
    except VenvUnavailable as exc:
        pytest.skip(f"cannot build the {backend} venv: {exc}")


def _check_backend(backend: str, tmp_path: Path, models: str, keras_file: str) -> dict:
    python = _backend_python(backend)
    argv = [str(python), str(HERE / "backend_check.py"), "--models", models, "--size", "96"]
    argv += ["--keras-file", keras_file]
    proc = subprocess.run(  # outside the tree: the installed bnexport runs
        argv,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "KERAS_BACKEND": backend},
    )
    result = _last_json(proc)
    assert result["backend"] == backend
    assert result["heavy_loaded"] == [], result["heavy_loaded"]
    return result


#: BN layers of the checked models; keras.applications' MobileNetV2 and ResNet50 fold all
EXPECTED_BNS = {"MobileNetV2": 52, "ResNet50": 53}


def _assert_rows(result: dict) -> None:
    for row in result["rows"]:
        name = row["model"]
        assert row["engine"] == "keras", (name, row["fallback_reason"])
        assert not row["fallback_reason"]
        assert row["bn_layers"] == EXPECTED_BNS[name]
        summary = row["summary"]
        assert summary["total"] == EXPECTED_BNS[name]
        assert summary["folded_forward"] + summary["folded_backward"] == summary["total"]
        assert "BatchNormalization" not in row["ops"]
        assert row["verified"]
        assert row["max_abs_err"] <= row["bound"], row
        if "file_engine" in row:
            assert row["file_engine"] == "keras"
            assert row["file_verified"]
            assert row["file_max_abs_err"] <= row["bound"]
            assert row["cli_exit"] == 0, row["cli_tail"]
            assert row["cli_written"]


@pytest.mark.slow
@pytest.mark.jax_backend
def test_jax_backend_exports_applications_without_tensorflow(tmp_path):
    result = _check_backend("jax", tmp_path, "MobileNetV2,ResNet50", keras_file="MobileNetV2")
    _assert_rows(result)
    assert "file_engine" in result["rows"][0]


@pytest.mark.slow
@pytest.mark.torch_backend
def test_torch_backend_exports_applications_without_tensorflow(tmp_path):
    result = _check_backend("torch", tmp_path, "MobileNetV2,ResNet50", keras_file="MobileNetV2")
    _assert_rows(result)
    assert "file_engine" in result["rows"][0]
