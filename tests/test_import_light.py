"""The inference side never imports TensorFlow, Keras or tf2onnx, and works without them.

Each check runs in a fresh interpreter (``sys.modules`` of the test process already
holds TensorFlow). A meta-path blocker makes ``tensorflow``, ``keras``, ``tf2onnx`` and
``tf_keras`` unimportable there, which reproduces the lean install (``pip install
bnexport[serve]``) even where they are installed; ``tests/lean_install_check.py`` checks
the real lean install in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("tensorflow", "keras", "tf2onnx", "tf_keras")

#: packages of the inference side: every module in them is imported with TF blocked
INFERENCE_PACKAGES = (
    "bnexport.runtime",
    "bnexport.serve",
    "bnexport.io",
    "bnexport.export.passes",
    "bnexport.quantize",
    "bnexport_plugins",
)

HELPERS = textwrap.dedent(
    f"""
    import sys
    HEAVY = {HEAVY!r}

    def loaded_heavy():
        return sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    """
)

BLOCKER = HELPERS + textwrap.dedent(
    """
    import importlib.abc

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ModuleNotFoundError(f"BLOCKED {name}", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    """
)


def _run(code: str, *, blocked: bool = True) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON object last."""
    script = (BLOCKER if blocked else HELPERS) + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import bnexport",
        "import bnexport, bnexport.errors, bnexport.atomic_write, bnexport.extras",
        "from bnexport.cli.main import build_parser; build_parser()",
    ],
)
def test_light_imports_load_nothing_heavy(code):
    out = _run(
        f"""
        {code}
        import json
        print(json.dumps({{"heavy": loaded_heavy(), "ort": "onnxruntime" in sys.modules}}))
        """,
        blocked=False,
    )
    assert out == {"heavy": [], "ort": False}, f"{code!r} imported {out}"


@pytest.mark.parametrize("package", INFERENCE_PACKAGES)
def test_inference_modules_import_without_tensorflow(package):
    """Every module of ``package`` imports with TF/Keras/tf2onnx blocked and loads none of them.

    A module that fails on another missing optional dependency (tensorrt, cuda) is
    reported but not a failure: that is the extra's business, not TensorFlow's.
    """
    out = _run(
        f"""
        import importlib, json, pkgutil
        pkg = importlib.import_module({package!r})
        bad, other = {{}}, {{}}
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            try:
                importlib.import_module(info.name)
            except ImportError as exc:
                (bad if "BLOCKED" in str(exc) else other)[info.name] = str(exc)
        print(json.dumps({{"bad": bad, "other": other, "heavy": loaded_heavy()}}))
        """
    )
    assert out["bad"] == {}, f"modules that import TensorFlow/Keras/tf2onnx: {out['bad']}"
    assert out["heavy"] == []


def test_cli_help_of_every_command_without_tensorflow():
    out = _run(
        """
        import contextlib, io, json
        from bnexport.cli.main import COMMANDS, main
        codes = {}
        for cmd in ("",) + tuple(c.replace("_", "-") for c in COMMANDS):
            argv = [cmd, "--help"] if cmd else ["--help"]
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    main(argv)
                except SystemExit as exc:
                    codes[cmd or "bnexport"] = exc.code
        print(json.dumps({"codes": codes, "heavy": loaded_heavy()}))
        """
    )
    assert out["heavy"] == []
    assert out["codes"] and set(out["codes"].values()) == {0}, out["codes"]


def test_fold_and_run_work_without_tensorflow(tmp_path):
    """``bnexport fold`` and ``bnexport run`` end to end with TF blocked; outputs vs NumPy."""
    out = _run(
        f"""
        import json
        import numpy as np, onnx, onnx.parser, onnx.numpy_helper as nh
        from bnexport.cli.main import main

        model = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3] x) => (float[N,2] y) {{
          h = MatMul(x, W)
          y = BatchNormalization(h, s, b, m, v)
        }}''')
        rng = np.random.default_rng(0)
        arrays = dict(W=rng.normal(size=(3, 2)), s=rng.uniform(0.5, 2, 2), b=rng.normal(size=2),
                      m=rng.normal(size=2), v=rng.uniform(0.5, 2, 2))
        for k, a in arrays.items():
            model.graph.initializer.append(nh.from_array(a.astype(np.float32), k))
        d = {str(tmp_path)!r}
        onnx.save(model, d + "/m.onnx")
        x = rng.normal(size=(4, 3)).astype(np.float32)
        np.save(d + "/x.npy", x)
        codes = [main(["fold", d + "/m.onnx", "-o", d + "/f.onnx"]),
                 main(["run", d + "/f.onnx", "-i", d + "/x.npy", "-o", d + "/y.npz"])]
        h = x.astype(np.float64) @ arrays["W"]
        ref = (h - arrays["m"]) / np.sqrt(arrays["v"] + 1e-5) * arrays["s"] + arrays["b"]
        with np.load(d + "/y.npz") as data:
            err = float(np.abs(data["y"] - ref).max())
        ops = [n.op_type for n in onnx.load(d + "/f.onnx").graph.node]
        print(json.dumps({{"codes": codes, "err": err, "ops": ops, "heavy": loaded_heavy()}}))
        """
    )
    assert out["codes"] == [0, 0]
    assert out["ops"] == ["MatMul", "Add"] or out["ops"] == ["Gemm"], out["ops"]
    assert out["err"] < 1e-4  # float32 graph vs float64 NumPy reference
    assert out["heavy"] == []


def test_export_without_keras_names_the_extra(tmp_path):
    """A command of the training side says which extra to install, in one line."""
    (tmp_path / "m.keras").write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # an empty zip
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCKER + "from bnexport.cli.main import main; sys.exit(main(sys.argv[1:]))",
            "quickstart",
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr  # a missing extra: an unusable request
    assert len(lines) == 1 and 'pip install "bnexport[keras]"' in lines[0], proc.stderr


def test_lazy_attribute_without_keras_names_the_extra():
    out = _run(
        """
        import json
        import bnexport
        from bnexport.errors import MissingExtraError
        try:
            bnexport.BatchNormalization
        except MissingExtraError as exc:
            print(json.dumps({"message": str(exc), "import_error": isinstance(exc, ImportError)}))
        """
    )
    assert out["import_error"]
    assert "bnexport.BatchNormalization needs" in out["message"]
    assert 'pip install "bnexport[keras]"' in out["message"]
