"""Running ``nlft`` in-process in tests: write a JSONL input, run a command that must stop, read why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a JSONL file at ``path``; returns the path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def cli_error(capsys, argv: list[str]) -> str:
    """What ``nlft argv`` printed on stderr when it stopped (it must stop with SystemExit)."""
    from nlft_kernels.recipes.cli import main

    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().err
