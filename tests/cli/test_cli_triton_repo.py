"""``bnexport triton-repo``: an op no Triton backend knows is refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import onnx.parser
import pytest

from bnexport.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def _save(text: str, path: Path) -> Path:
    onnx.save(onnx.parser.parse_model(text), path)
    return path


def test_unknown_op_is_refused_naming_it(tmp_path, capsys):
    src = _save(
        """<ir_version: 8, opset_import: ["" : 17, "acme" : 1]>
        g (float[N,4] x) => (float[N,4] y) { h = Relu(x)  y = acme.Warp(h) }""",
        tmp_path / "warp.onnx",
    )
    out = tmp_path / "repo"
    assert main(["triton-repo", str(src), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "op 'Warp' (domain 'acme'" in err and "no Triton backend could load" in err
    assert not out.exists()  # nothing written


def test_misspelled_default_domain_op_is_refused(tmp_path, capsys):
    src = tmp_path / "typo.onnx"
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,4] y) { y = Relu(x) }"""
    )
    model.graph.node[0].op_type = "Relux"
    model.graph.node[0].name = "act"
    onnx.save(model, src)
    assert main(["triton-repo", str(src), str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert "op 'Relux' (domain 'ai.onnx', node 'act')" in err


def test_known_ops_pass(tmp_path, capsys):
    """ONNX ops, onnxruntime contrib ops, FusedNorm and model-local functions are known."""
    from bnexport.serve.triton.repo import check_known_ops

    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1, "local" : 1]>
        g (float[N,4] x) => (float[N,4] y) { h = Relu(x)  g2 = com.microsoft.Gelu(h)
        y = local.Twice(g2) }
        <domain: "local", opset_import: ["" : 17]> Twice (a) => (b) { b = Add(a, a) }"""
    )
    check_known_ops(model, "m.onnx")


def _without_serve_extra(code: str, cwd: Path) -> subprocess.CompletedProcess:
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pydantic', 'fastapi', 'uvicorn', 'grpc', "
        "'tritonclient', 'starlette', 'prometheus_client', 'httpx'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", blocker + code],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_readme_install_table_tells_the_truth_about_triton_repo(tmp_path):
    """The base install row lists only what runs without [serve]; triton-repo needs it."""
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ")]
    base = next(r for r in rows if "`pip install bnexport`" in r)
    serve = next(r for r in rows if "bnexport[serve]" in r)
    assert "triton-repo" not in base and "triton-repo" in serve
    _save(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,4] x) => (float[N,4] y) { y = Relu(x) }""",
        tmp_path / "m.onnx",
    )
    run = "from bnexport.cli.main import main; sys.exit(main(sys.argv[1:] or {argv!r}))"
    proc = _without_serve_extra(run.format(argv=["triton-repo", "m.onnx", "repo"]), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith('(pip install "bnexport[serve]")')
    # what the base row promises runs without the extra
    import numpy as np

    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    for argv in (["fold", "m.onnx", "-o", "f.onnx"], ["run", "m.onnx", "--inputs", "x.npy"]):
        proc = _without_serve_extra(run.format(argv=argv), tmp_path)
        assert proc.returncode == 0, (argv, proc.stderr)


@pytest.mark.parametrize("flag", ["--help"])
def test_help_names_model(flag, capsys):
    with pytest.raises(SystemExit):
        main(["triton-repo", flag])
    assert "MODEL" in capsys.readouterr().out
