"""``ServeSettings``, the one home of the server's defaults; ``serve_model(path, settings)``.

- every place that offers a server setting (the CLI, the KServe manifests, the Triton
  repository writer, the app, the HTTP protocol) has the default of :class:`ServeSettings`;
- ``settings.py`` is a leaf (imports nothing from bnexport), so reading a default is light;
- ``serve_model(path, settings)`` does not warn; the former keyword form warns once,
  naming the new form, and serves with the same settings (checked on a real server).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import httpx
import pytest
from support import wait_until

from bnexport.errors import UsageError
from bnexport.serve import server
from bnexport.serve.settings import INFLIGHT_BODIES, ServeSettings

D = ServeSettings()

#: every keyword of the former ``serve_model(path, host, port, *, ...)``: each must keep working
#: for one release (decisions.md, "The data plane")
FORMER_KEYWORDS = (
    "host", "port", "backend", "device", "precision", "max_batch", "batch_timeout_ms",
    "batch_policy", "token", "max_body_mb", "instances", "intra_op_threads", "ort_spinning",
    "memory_arena", "arena_shrinkage", "log_level", "graceful_timeout_s", "max_inflight_mb",
    "max_inflight_requests", "body_timeout_s", "header_timeout_s", "keep_alive_s", "warmup",
    "grpc_port", "model_control", "open_metrics",
)  # fmt: skip


def _defaults(function) -> dict[str, object]:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


# -- one home of the defaults ----------------------------------------------------------------------
def test_cli_defaults_are_the_settings_defaults(monkeypatch, capsys):
    """``bnexport serve MODEL`` with no flag asks for exactly ``ServeSettings()``."""
    from bnexport.cli import cmd_serve
    from bnexport.cli.main import build_parser

    monkeypatch.delenv("BNEXPORT_SERVE_TOKEN", raising=False)
    parser = build_parser()
    args = parser.parse_args(["serve", "m.onnx"])
    assert cmd_serve.settings_from_args(args) == ServeSettings()
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for quoted in (
        f"(default {D.max_batch})",
        f"(default {D.max_body_mb:g})",
        f"(default {D.max_inflight_requests})",
        f"(default {D.body_timeout_s:g})",
        f"(default {D.header_timeout_s:g})",
        f"{INFLIGHT_BODIES}x --max-body-mb",
        f"wait up to {D.admission_wait_s:g} s",
    ):
        assert quoted in help_text


def test_kserve_and_triton_writers_default_to_the_server_settings():
    from bnexport.serve import kserve
    from bnexport.serve.triton.repo import write_triton_repo

    for writer in (
        kserve.bnexport_isvc_yaml,
        kserve.custom_container_isvc_yaml,
        kserve.write_manifests,
        write_triton_repo,
    ):
        defaults = _defaults(writer)
        assert defaults["max_batch"] == D.max_batch, writer.__name__
        assert defaults["batch_timeout_ms"] == D.batch_timeout_ms, writer.__name__
        if "max_inflight_requests" in defaults:
            assert defaults["max_inflight_requests"] == D.max_inflight_requests
    assert _defaults(write_triton_repo)["instances"] == D.instances


def test_app_and_http_protocol_defaults_agree_with_the_settings():
    """The app's own keyword defaults (used by tests and embedders) are the server's."""
    from bnexport.serve.rest.app import create_app
    from bnexport.serve.rest.http11 import protocol_class

    app = _defaults(create_app)
    assert app["max_body_bytes"] == D.max_body_bytes
    assert app["max_inflight_requests"] == D.max_inflight_requests
    assert app["body_timeout_s"] == D.body_timeout_s
    assert app["batch_policy"] == D.batch_policy
    assert app["instances"] == D.instances
    assert app["admission_wait_s"] == D.admission_wait_s
    assert _defaults(protocol_class)["header_timeout_s"] == D.header_timeout_s


def test_settings_module_is_a_leaf():
    """No import of bnexport at all, not even inside a function (the import graph's rule).

    (``tests/test_lazy_names.py`` checks that importing it loads nothing heavy.)
    """
    import bnexport.serve.settings as settings_module

    tree = ast.parse(Path(settings_module.__file__).read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert not [m for m in imported if m and m.split(".")[0] == "bnexport"], imported


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"port": 70000}, "--port=70000 (0..65535)"),
        ({"grpc_port": -1}, "--grpc-port=-1 (0..65535)"),
        ({"port": 9000, "grpc_port": 9000}, "--grpc-port=9000 (must differ from --port)"),
        ({"max_batch": 0}, "--max-batch=0 (>= 1)"),
        ({"batch_timeout_ms": -1.0}, "--batch-timeout-ms=-1.0 (>= 0)"),
        ({"batch_policy": "fifo"}, "--batch-policy='fifo' (adaptive or window)"),
        ({"instances": 0}, "--instances=0 (>= 1)"),
        ({"max_body_mb": 0.0}, "--max-body-mb=0.0 (> 0)"),
        ({"max_inflight_mb": -2.0}, "--max-inflight-mb=-2.0 (> 0)"),
        ({"max_inflight_requests": 0}, "--max-inflight-requests=0 (>= 1)"),
        ({"body_timeout_s": 0.0}, "--body-timeout-s=0.0 (> 0)"),
        ({"header_timeout_s": 0.0}, "--header-timeout-s=0.0 (> 0)"),
        ({"model_control": "poll"}, "--model-control='poll' (none or explicit)"),
        ({"log_level": "loud"}, "--log-level='loud'"),
    ],
)
def test_settings_problems_name_the_flag(changes, problem):
    problems = ServeSettings(**changes).problems()
    assert len(problems) == 1
    assert problems[0].startswith(problem)


def test_default_settings_have_no_problem_and_derived_bounds():
    assert D.problems() == []
    assert ServeSettings(port=0, grpc_port=0, body_timeout_s=None).problems() == []
    assert D.max_body_bytes == int(D.max_body_mb * (1 << 20))
    assert D.max_inflight_bytes == INFLIGHT_BODIES * D.max_body_bytes
    assert ServeSettings(max_inflight_mb=1.5).max_inflight_bytes == 3 << 19


# -- serve_model(path, settings) and the former keyword form ---------------------------------------
@pytest.fixture
def served(monkeypatch) -> list[tuple[object, ServeSettings]]:
    """Calls reaching the server proper, with the settings they carry (nothing is bound)."""
    calls: list[tuple[object, ServeSettings]] = []
    monkeypatch.setattr(server, "_serve", lambda path, s, print_fn: calls.append((path, s)))
    return calls


def test_settings_form_does_not_warn(served):
    settings = ServeSettings(port=1234, grpc_port=8001, max_batch=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        server.serve_model("m.onnx", settings)
        server.serve_model("m.onnx")
    assert served == [("m.onnx", settings), ("m.onnx", ServeSettings())]


def test_former_keyword_form_warns_once_with_the_new_form(served):
    with pytest.warns(DeprecationWarning) as record:
        server.serve_model("m.onnx", port=1234, grpc_port=8001, max_batch=4)
    assert len(record) == 1
    message = str(record[0].message)
    assert "serve_model(path, ServeSettings(port=..., grpc_port=..., max_batch=...))" in message
    assert record[0].filename == __file__  # points at the caller, not at server.py
    assert served == [("m.onnx", ServeSettings(port=1234, grpc_port=8001, max_batch=4))]


def test_every_former_keyword_is_a_settings_field(served):
    fields = {f.name for f in dataclasses.fields(ServeSettings)}
    assert set(FORMER_KEYWORDS) <= fields
    values = {name: getattr(ServeSettings(), name) for name in FORMER_KEYWORDS}
    values.update(port=1, token="t", max_batch=3, grpc_port=2)
    with pytest.warns(DeprecationWarning):
        server.serve_model("m.onnx", **values)
    assert served[-1][1] == ServeSettings(**values)
    # keywords apply over a settings object given with them
    with pytest.warns(DeprecationWarning):
        server.serve_model("m.onnx", ServeSettings(max_batch=8, token="a"), token="b")
    assert served[-1][1] == ServeSettings(max_batch=8, token="b")


def test_wrong_arguments_are_type_errors(served):
    with pytest.raises(TypeError, match="unexpected keyword argument 'prot'"):
        server.serve_model("m.onnx", prot=1)
    with pytest.raises(TypeError, match=r"ServeSettings\(host=\.\.\., port=\.\.\.\)"):
        server.serve_model("m.onnx", "0.0.0.0")  # the former positional host
    assert served == []


def test_bad_settings_fail_before_binding(repo_dir):
    """One line naming the flag; nothing printed, no port bound, no model loaded."""
    printed: list[str] = []
    with pytest.raises(UsageError, match=r"--max-batch=0 \(>= 1\)"):
        server.serve_model(repo_dir, ServeSettings(port=0, max_batch=0), print_fn=printed.append)
    assert printed == []


_FORMER_FORM = """
import sys
from bnexport.serve.server import serve_model
serve_model(sys.argv[1], port=0, max_batch=4, token="tok", warmup=False, log_level="warning",
            print_fn=lambda line: print(line, flush=True))
"""


def test_former_keyword_form_still_serves_with_those_settings(repo_dir):
    """A real server started the old way: it warns once on stderr and applies every keyword."""
    proc = subprocess.Popen(
        [sys.executable, "-W", "always::DeprecationWarning", "-c", _FORMER_FORM, str(repo_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        wait_until(lambda: lines or proc.poll() is not None, 60, message="no banner")
        assert lines and lines[0].startswith("Serving digits, gather on http://"), lines
        url = lines[0].split(" on ", 1)[1].split()[0]
        assert httpx.get(f"{url}/v2/models/digits/config").status_code == 401  # token="tok"
        config = httpx.get(
            f"{url}/v2/models/digits/config", headers={"Authorization": "Bearer tok"}
        ).json()
        assert config["max_batch_size"] == 4  # max_batch=4 reached the repository
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    warned = [line for line in err.splitlines() if "DeprecationWarning" in line]
    assert len(warned) == 1, err[-2000:]
    assert "ServeSettings(port=..., max_batch=..., token=..." in warned[0]
