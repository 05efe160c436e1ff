"""The questions ``generate``, ``eval`` and ``demo`` work on: where they come from (``--data``) and
the instruction their prompts carry, read through one function, :func:`read_questions`, so that
another source of questions (a generated task) is one more branch there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nlft_kernels.recipes.errors import BadInput

QUESTION_FIELDS = ("question", "answer")


@dataclass(frozen=True)
class Questions:
    """Rows with a ``question`` and a reference ``answer`` (strings), the source they were read
    from (for messages) and the system prompt (``instruction``) of their base-view prompts."""

    rows: list[dict]
    source: str
    instruction: str


def _split_file(folder: Path, split: str) -> Path | None:
    """``folder/{split}.jsonl``, or its .xz/.gz copy, if there."""
    for name in (f"{split}.jsonl", f"{split}.jsonl.xz", f"{split}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_data(value: str | None, split: str) -> str:
    """The source :func:`nlft_kernels.training.data.read_rows` reads for ``--data value`` and
    ``split``: the GSM8K embedded in the package when ``value`` is None, a folder's
    ``{split}.jsonl``, a file, or a ``datasets`` hub name. BadInput for a source that is not there."""
    from nlft_kernels.training.data import data_suffix

    if value is None:
        from nlft_kernels.recipes.data import GSM8K_SPLITS, gsm8k_file

        if split not in GSM8K_SPLITS:
            raise BadInput(f"--split {split}: the embedded GSM8K has the splits {', '.join(GSM8K_SPLITS)}")
        return str(gsm8k_file(split))
    path = Path(value)
    if path.is_dir():
        file = _split_file(path, split)
        if file is None:
            raise BadInput(f"--data {value}: the folder has no {split}.jsonl")
        return str(file)
    if data_suffix(path) in (".jsonl", ".json") and not path.is_file():
        raise BadInput(f"--data: no such file: {value}")
    return value


def read_data(value: str | None, split: str) -> list[dict]:
    """Rows with ``question`` and ``answer`` strings from ``--data value`` (see :func:`resolve_data`).

    BadInput names the file and line (the row, for a hub dataset) of a row whose field is missing
    or not a string, and a file that cannot be read (not JSON, not UTF-8)."""
    from nlft_kernels.training.data import data_suffix, read_numbered_jsonl, read_rows

    source = resolve_data(value, split)
    jsonl = Path(source).is_file() and data_suffix(source) == ".jsonl"
    try:
        numbered = read_numbered_jsonl(source) if jsonl else list(enumerate(read_rows(source, split=split)))
    except Exception as err:  # a bad file or an unreachable hub name: say which, and why
        raise BadInput(f"--data {source}: {err}") from err
    for number, row in numbered:
        where = f"{source}, line {number}" if jsonl else f"{source}, row {number}"
        for name in QUESTION_FIELDS:
            if name not in row or row[name] is None:
                raise BadInput(f"--data {where}: missing field {name!r} (fields present: {sorted(row)})")
            if not isinstance(row[name], str):
                raise BadInput(f"--data {where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    if not numbered:
        raise BadInput(f"--data {source}: no rows")
    return [row for _, row in numbered]


def read_questions(data: str | None, split: str) -> Questions:
    """The questions of ``--data`` (the embedded GSM8K when None) and ``--split``, with the GSM8K
    instruction every command's prompts use (generation, evaluation and the records judged)."""
    from nlft_kernels.recipes.generation import GSM8K_INSTRUCTION

    return Questions(read_data(data, split), resolve_data(data, split), GSM8K_INSTRUCTION)
