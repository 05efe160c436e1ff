"""The sources are ruff clean (lint and format), as the style guide asks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (the [dev] extra)")
    sources = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    if sources.returncode != 0:
        pytest.skip("not a git checkout")
    files = sources.stdout.split()
    return subprocess.run(["ruff", *args, *files], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check():
    done = _ruff("check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format():
    done = _ruff("format", "--check")
    assert done.returncode == 0, done.stdout + done.stderr
