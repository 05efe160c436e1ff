"""Running ``nlft`` in tests: the real process (``python -m nlft_kernels``: exit status, stdout,
stderr, files left behind), a JSONL input, and what a successful run may print on stderr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A loaded machine starts python, torch and transformers slowly.
TIMEOUT = 600
# tqdm's progress bars (they redraw with \r): "desc:  50%|█████     | 1/2 [00:01<00:01, 1.2it/s]".
_BAR = re.compile(r"^[^|\n]*\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]\s*$")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a JSONL file at ``path``; returns the path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def nlft_command(*args) -> list[str]:
    return [sys.executable, "-m", "nlft_kernels", *map(str, args)]


def nlft_env(**extra: str) -> dict:
    """The environment of an ``nlft`` process in tests: no network for the hub."""
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)


def run_nlft(*args, timeout: float = TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    """``nlft args`` run to its end as a process from the repository root (text output captured)."""
    kwargs.setdefault("env", nlft_env())
    return subprocess.run(nlft_command(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)


def not_progress(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not tqdm's progress bars."""
    pieces = (piece.strip() for line in stderr.split("\n") for piece in line.split("\r"))
    return [piece for piece in pieces if piece and not _BAR.match(piece)]


def nlft_ok(*args, allowed: tuple[str, ...] = (), **kwargs) -> subprocess.CompletedProcess:
    """``nlft args``, which must exit 0 with nothing on stderr but progress bars and lines
    containing one of ``allowed``; returns the finished process."""
    done = run_nlft(*args, **kwargs)
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stderr}"
    other = [line for line in not_progress(done.stderr) if not any(a in line for a in allowed)]
    assert not other, f"stderr of a successful run: {other}"
    return done


def nlft_error(*args, status: int = 2, **kwargs) -> str:
    """``nlft args``, which must exit with ``status`` and print one line on stderr (besides
    progress bars); returns that line."""
    done = run_nlft(*args, **kwargs)
    lines = not_progress(done.stderr)
    assert done.returncode == status, f"exit status {done.returncode}, not {status}\n{done.stderr}"
    assert len(lines) == 1, f"not one line on stderr: {lines}"
    return lines[0]


def bad_input(*args) -> str:
    """The message of the BadInput that ``nlft args`` stops with, run in this process (the typed
    error a command raises; how main prints it and exits is checked on real processes)."""
    import pytest

    from nlft_kernels.recipes.cli import parse_args
    from nlft_kernels.recipes.commands import command
    from nlft_kernels.recipes.errors import BadInput

    with pytest.raises(BadInput) as info:
        parsed = parse_args([str(a) for a in args])
        command(parsed.command).run(parsed)
    return str(info.value)
