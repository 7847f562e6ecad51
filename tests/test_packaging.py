"""pyproject.toml follows the source tree: every package is listed, extras name real extras."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: tomli is in the [test] extra
    import tomli as tomllib


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed(pyproject):
    """A folder with ``__init__.py`` missing from ``packages`` is absent from a real install."""
    setup = pyproject["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = set()
    for name, folder in setup["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join([name, *rel.parts]))
    assert found - listed == set(), f"packages missing from pyproject.toml: {found - listed}"
    assert listed - found == set(), f"listed packages that do not exist: {listed - found}"


def test_base_install_is_the_inference_side(pyproject):
    base = {re.split(r"[<>=!;\[ ]", d)[0].lower() for d in pyproject["project"]["dependencies"]}
    assert base >= {"numpy", "onnx", "onnx-ir", "onnxruntime"}
    heavy = {"tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "scikit-learn", "matplotlib"}
    assert base & heavy == set(), f"training-side packages in the base install: {base & heavy}"


def test_extras(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    assert {"keras", "legacy", "serve", "gpu", "tensorrt", "test", "all"} <= set(extras)
    assert any(d.startswith("tf2onnx>=1.17,<1.18") for d in extras["keras"])  # private APIs
    for name, deps in extras.items():  # self-references name extras that exist
        for dep in deps:
            if dep.startswith("bnexport["):
                wanted = dep[len("bnexport[") : dep.index("]")].split(",")
                assert set(wanted) <= set(extras), f"[{name}] refers to unknown {wanted}"
    assert "bnexport[keras,legacy,serve]" in extras["test"]  # the README's test command


def test_extra_of_module_names_real_extras(pyproject):
    from bnexport.extras import EXTRA_OF_MODULE

    extras = set(pyproject["project"]["optional-dependencies"])
    assert set(EXTRA_OF_MODULE.values()) <= extras
