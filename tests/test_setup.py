"""setup.py: an install where the extension cannot be built still installs the pure-Python
package, and says why (README's promise; the full build is what CI's install does)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

try:  # pip --no-build-isolation needs setuptools' bdist_wheel (setuptools >= 70.1, or wheel)
    from setuptools.command.bdist_wheel import bdist_wheel  # noqa: F401
except ImportError:
    pytest.importorskip("wheel", reason="setuptools < 70.1 without wheel cannot build a wheel in place")


def _install(tmp_path: Path, cxx: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``pip install --no-build-isolation --no-deps --target`` of a copy of the sources, with ``CXX``."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json")
    shutil.copytree(REPO / "nlft_kernels", src / "nlft_kernels", ignore=ignore)
    shutil.copytree(REPO / "csrc", src / "csrc", ignore=ignore)
    target = tmp_path / "site"
    env = dict(os.environ, CXX=cxx, NLFT_SKIP_CUDA_BUILD="1", PIP_NO_INPUT="1")
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index"]
    done = subprocess.run(
        cmd + ["--target", str(target), str(src)], env=env, capture_output=True, text=True, timeout=600
    )
    return done, target


def _backends_of(target: Path) -> dict:
    """nlft_kernels.backends() of the copy installed in ``target``, imported in a fresh interpreter."""
    # This copy only: backends() would otherwise load the _C of another installation of the
    # package on sys.path (as it does for tests run from a checkout).
    code = (
        "import importlib, json, nlft_kernels\n"
        "importlib.import_module('nlft_kernels.backends')._installed_file = lambda prefix: None\n"
        "print(json.dumps(nlft_kernels.backends()))"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=target, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("cxx", "why"),
    [
        ("/nonexistent/c++", "no C++ compiler: '/nonexistent/c++' is not on PATH"),
        ("false", "the build failed"),  # a compiler that fails on every source
    ],
)
def test_install_without_a_working_compiler(tmp_path, cxx, why):
    done, target = _install(tmp_path, cxx)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installing the pure-Python package" in done.stdout + done.stderr
    package = target / "nlft_kernels"
    assert (package / "__init__.py").is_file() and not list(package.glob("_C*.so"))
    info = json.loads((package / "_build_info.json").read_text())
    assert info["extension"] == "not built" and why in info["reason"]
    backends = _backends_of(target)
    assert backends["cpp"].startswith("unavailable") and why in backends["cpp"]
    assert backends["torch"].startswith("available")
    _embedded_data_installed(target)


def _embedded_data_installed(target: Path) -> None:
    """The installed copy (not the checkout) carries GSM8K and reads it with the hub offline."""
    data = target / "nlft_kernels" / "data" / "gsm8k"
    assert {p.name for p in data.iterdir()} >= {"train.jsonl.xz", "test.jsonl.xz", "LICENSE"}
    code = (
        "import argparse, nlft_kernels.cli as cli\n"
        "rows = cli.read_data(None, 'test', argparse.ArgumentParser())\n"
        "print(cli.resolve_data(None, 'test', argparse.ArgumentParser()), len(rows))"
    )
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=target, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path, count = out.stdout.split()
    assert Path(path).resolve() == (data / "test.jsonl.xz").resolve() and int(count) == 1319
