"""NLFT data: rows from JSONL files or the ``datasets`` hub, and the records NLFT trains on."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _is_local(source: str | os.PathLike) -> bool:
    path = Path(source)
    return path.suffix in (".jsonl", ".json") or path.exists()


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-blank line (at most ``limit``).

    Raises ValueError naming the file and the 1-based line for a line that is not a JSON object.
    """
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_rows(source: str | os.PathLike, split: str = "train", limit: int | None = None) -> list[dict]:
    """Rows (dicts) of ``source``: a local JSONL file, or else a ``datasets`` hub name read with
    ``load_dataset(source, split=split)`` (``split`` is ignored for a local file).

    ``limit`` keeps the first rows only. A bad JSONL line raises ValueError naming file and line.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if _is_local(source):
        if not Path(source).is_file():
            raise FileNotFoundError(f"no such file: {source}")
        return read_jsonl(source, limit)
    from datasets import load_dataset

    dataset = load_dataset(str(source), split=split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [dict(row) for row in dataset]
