"""Where commands write: ``--out`` checked before any work (so that no model loads and no response
is generated for a path that cannot take the result), and the JSON files written at the end."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from nlft_kernels.recipes.errors import BadInput


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _probe_folder(folder: Path, flag: str, out: Path) -> None:
    """BadInput unless a file can be created in the existing folder ``folder`` (a temporary file,
    removed at once: permissions alone do not tell, e.g. root under /proc or a read-only mount)."""
    if not folder.is_dir():
        raise BadInput(f"{flag} {out}: {folder} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".nlft-probe-"):
            pass
    except OSError as err:
        raise BadInput(f"{flag} {out}: cannot be written ({folder}: {err.strerror or err})") from None


def check_out_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a file a command can create or append to; BadInput (one line) if it is a
    folder, lies under a file, or sits where nothing can be written. Nothing is created."""
    out = Path(path)
    if out.is_dir():
        raise BadInput(f"{flag} {out}: is a directory: name a file")
    if out.exists():
        if not out.is_file():
            raise BadInput(f"{flag} {out}: not a regular file")
        try:
            with open(out, "ab"):
                pass
        except OSError as err:
            raise BadInput(f"{flag} {out}: cannot be written ({err.strerror or err})") from None
        return out
    _probe_folder(_first_existing(out.parent), flag, out)
    return out


def check_out_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a folder a command can create or write into; BadInput (one line) if it is a
    file, lies under a file, or sits where nothing can be written. Nothing is created."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{flag} {out}: is a file; name a folder")
    _probe_folder(_first_existing(out), flag, out)
    return out


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (a link or another spelling of the path included)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def write_json(path: str | os.PathLike, value: dict) -> None:
    """``value`` as indented UTF-8 JSON at ``path`` (its folder created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
