"""A small venv per Keras backend (JAX, torch) with bnexport and no TensorFlow.

What a JAX or torch user installs (README, "Other Keras backends"): bnexport's base
dependencies (from ``pyproject.toml``'s ``[project] dependencies``), Keras 3 at the bound
of the ``[keras]`` extra, and the backend itself, but neither the ``[keras]`` extra (it
brings TensorFlow and tf2onnx) nor TensorFlow. This module builds exactly that, once,
under a cache folder, then installs bnexport into it from the working tree on every call
(``--no-deps``, a real non-editable install from a copy of the tree, so the sub-packages
listed in ``pyproject.toml`` are what gets installed and the tree itself gets no build
artifacts).

Usage::

    python tests/backends/backend_venv.py jax [--venv DIR]     # build/refresh, print path
    python tests/backends/backend_venv.py torch

Cache: ``$BNEXPORT_BACKEND_VENVS`` or ``~/.cache/bnexport/backend-venvs``, one folder per
backend and Python version; a stamp file records the requirements, and a change of them
(a new Keras bound in ``pyproject.toml``) rebuilds the dependencies. Building needs the
package index (about 50 s and 0.9 GB for JAX, 40 s and 1.2 GB for the torch CPU wheel);
:class:`VenvUnavailable` says why when it cannot be built (no network), and the tests
skip with that reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the backend's own packages (torch: the CPU wheel; a bare ``torch`` pulls a CUDA build)
BACKEND_PACKAGES = {
    "jax": ["jax[cpu]"],
    "torch": ["torch==2.13.0"],
}
#: what must never be installed in these venvs
FORBIDDEN = ("tensorflow", "tensorflow-cpu", "tf2onnx", "tf-keras")
STAMP = "bnexport-backend-venv.json"
#: files and folders of the tree that are never part of an install
_SKIP = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}


class VenvUnavailable(RuntimeError):
    """The venv could not be built here (no network, no pip): the reason, one line."""


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(backend: str) -> list[str]:
    """Base dependencies + Keras (the ``[keras]`` extra's bound) + the backend's packages."""
    if backend not in BACKEND_PACKAGES:
        raise ValueError(f"backend must be one of {sorted(BACKEND_PACKAGES)}: {backend!r}")
    project = _pyproject()["project"]
    keras = [
        r
        for r in project["optional-dependencies"]["keras"]
        if re.match(r"^keras\b(?![-_])", r.split(";")[0].strip())
    ]
    return [*project["dependencies"], *keras, *BACKEND_PACKAGES[backend]]


def default_venv(backend: str) -> Path:
    """The cached venv folder of ``backend`` for this Python version."""
    base = os.environ.get("BNEXPORT_BACKEND_VENVS") or Path.home() / ".cache/bnexport/backend-venvs"
    return Path(base) / f"{backend}-py{sys.version_info.major}{sys.version_info.minor}"


def python_of(venv: Path) -> Path:
    """The venv's interpreter."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(argv: list[str], what: str, timeout: float = 1800) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VenvUnavailable(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "ERROR" in line or "rror:" in line]
        reason = (errors or lines or [f"exit {proc.returncode}"])[-1].strip()
        raise VenvUnavailable(f"{what} failed: {reason[:300]}")
    return proc.stdout


def _copy_tree(dest: Path) -> None:
    """The files of the working tree (tracked and untracked, not ignored) into ``dest``.

    ``git ls-files`` where the tree is a git checkout (it reads, changes nothing); else
    the folder less caches, venvs and build outputs.
    """
    try:
        listed = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.decode()
        files = [f for f in listed.split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not _SKIP & set(p.relative_to(ROOT).parts)
        ]
    for rel in files:
        src = ROOT / rel
        if not src.is_file() or not (rel.startswith(("bnexport/", "plugins/")) or "/" not in rel):
            continue  # the package sources and the top-level files (pyproject, README)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def ensure_venv(backend: str, venv: Path | None = None) -> Path:
    """Build (or reuse) ``backend``'s venv and install bnexport from the tree into it.

    Returns:
        The venv's interpreter.

    Raises:
        VenvUnavailable: the venv or a package could not be installed (the reason).
    """
    venv = Path(venv or default_venv(backend))
    wanted = requirements(backend)
    stamp = venv / STAMP
    python = python_of(venv)
    current = None
    if stamp.is_file() and python.exists():
        try:
            current = json.loads(stamp.read_text()).get("requirements")
        except (OSError, ValueError):
            current = None
    if current != wanted:
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "venv", str(venv)], f"python -m venv {venv}")
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        _run([*pip, "setuptools>=77", "wheel"], "pip install setuptools")
        _run([*pip, *wanted], f"pip install {' '.join(wanted)}")
        stamp.write_text(json.dumps({"requirements": wanted}, indent=1) + "\n")
    with tempfile.TemporaryDirectory(prefix="bnexport-src-") as tmp:
        _copy_tree(Path(tmp))
        _run(
            [
                str(python),
                *("-m", "pip", "install", "-q", "--disable-pip-version-check"),
                *("--no-deps", "--no-build-isolation", "--force-reinstall", tmp),
            ],
            "pip install --no-deps bnexport (from the tree)",
        )
    installed = _run([str(python), "-m", "pip", "list", "--format=json"], "pip list")
    names = {p["name"].lower().replace("_", "-") for p in json.loads(installed)}
    present = sorted(names & set(FORBIDDEN))
    if present:
        raise VenvUnavailable(f"{venv}: {', '.join(present)} got installed (must not be)")
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend", choices=sorted(BACKEND_PACKAGES))
    parser.add_argument("--venv", type=Path, help="folder (default: the cache folder)")
    args = parser.parse_args(argv)
    try:
        print(ensure_venv(args.backend, args.venv))
    except VenvUnavailable as exc:
        print(f"cannot build the {args.backend} venv: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
