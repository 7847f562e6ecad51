"""``bnexport.lazy_names``: the one ``__getattr__``/``__dir__`` of the packages' lazy tables."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from bnexport.errors import MissingExtraError
from bnexport.lazy_names import lazy_names


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """Two importable modules: one defining ``value``, one importing a missing dependency."""
    (tmp_path / "lazy_fake_ok.py").write_text("value = 42\nCALLS = []\n")
    (tmp_path / "lazy_fake_missing.py").write_text("import no_such_dependency_abc\nthing = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("lazy_fake_ok", "lazy_fake_missing"):
        sys.modules.pop(name, None)


def test_first_access_imports_and_caches(modules):
    namespace: dict[str, object] = {}
    getattr_, dir_ = lazy_names(
        "pkg", {"value": "lazy_fake_ok", "thing": "lazy_fake_missing"}, namespace
    )
    assert "lazy_fake_ok" not in sys.modules
    assert getattr_("value") == 42
    assert namespace["value"] == 42  # later reads are plain attribute reads
    assert dir_() == ["thing", "value"]
    with pytest.raises(AttributeError, match="module 'pkg' has no attribute 'other'"):
        getattr_("other")


def test_missing_dependency_names_what_to_install(modules):
    getattr_, _ = lazy_names("pkg", {"thing": "lazy_fake_missing"}, {})
    with pytest.raises(MissingExtraError, match=r"pkg.thing needs no_such_dependency_abc"):
        getattr_("thing")


def test_a_wrong_table_entry_is_a_bug_not_a_missing_extra():
    getattr_, _ = lazy_names("pkg", {"x": "bnexport.no_such_module"}, {})
    with pytest.raises(ModuleNotFoundError) as info:
        getattr_("x")
    assert not isinstance(info.value, MissingExtraError)


@pytest.mark.parametrize("package", ["bnexport.serve", "bnexport.serve.ray", "bnexport.parity"])
def test_every_table_entry_resolves(package):
    """Each lazy name exists in the module its table names (a typo would fail on first use)."""
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None
    assert sorted(module.__all__) == dir(module)


def test_importing_the_packages_and_the_serve_settings_stays_light():
    """A lazy package, and the server's defaults (``bnexport.serve.settings``), load nothing."""
    code = (
        "import sys, bnexport.serve, bnexport.serve.ray, bnexport.parity\n"
        "from bnexport.serve.settings import ServeSettings\n"
        "heavy = [m for m in ('fastapi', 'uvicorn', 'onnxruntime', 'ray', 'tensorflow', 'numpy',"
        " 'grpc') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
