"""NLFT data: rows from JSONL files or the ``datasets`` hub, and the records NLFT trains on."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# Compressed files are read as their text (the embedded GSM8K is ``.jsonl.xz``).
_COMPRESSION = {".xz": "lzma", ".gz": "gzip", ".bz2": "bz2"}


def data_suffix(source: str | os.PathLike) -> str:
    """The suffix that says what a file holds, under any compression: ``.jsonl`` for ``a.jsonl.xz``."""
    path = Path(source)
    if path.suffix in _COMPRESSION:
        path = path.with_suffix("")
    return path.suffix


def open_text(path: str | os.PathLike):
    """``path`` opened for reading UTF-8 text, decompressed when it ends in .xz, .gz or .bz2."""
    module = _COMPRESSION.get(Path(path).suffix)
    if module is None:
        return open(path, encoding="utf-8")
    import importlib

    return importlib.import_module(module).open(path, "rt", encoding="utf-8")


def _is_local(source: str | os.PathLike) -> bool:
    return data_suffix(source) in (".jsonl", ".json") or Path(source).exists()


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-blank line (at most ``limit``).

    Raises ValueError naming the file and the 1-based line for a line that is not a JSON object.
    """
    return [row for _, row in read_numbered_jsonl(path, limit)]


def read_numbered_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[tuple[int, dict]]:
    """(1-based line number in the file, object) of each non-blank line of a JSONL file (at most
    ``limit``): the numbers count blank lines too, so that messages name the line an editor shows.

    Raises ValueError naming the file and the line for a line that is not a JSON object.
    """
    rows: list[tuple[int, dict]] = []
    with _open_bytes(path) as f:
        for number, raw in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            line = _decode(path, raw, number)
            if not line.strip():
                continue
            row = _parse_json(path, line, line_number=number)
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def _open_bytes(path: str | os.PathLike):
    """``path`` opened for reading bytes, decompressed when it ends in .xz, .gz or .bz2."""
    module = _COMPRESSION.get(Path(path).suffix)
    if module is None:
        return open(path, "rb")
    import importlib

    return importlib.import_module(module).open(path, "rb")


def _decode(path, data: bytes, line_number: int | None = None) -> str:
    """``data`` as UTF-8 text; a ValueError naming ``path`` and the line (``line_number``, else the
    line within ``data``) of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = line_number if line_number is not None else data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        bad = data[err.start : err.end]
        raise ValueError(f"{path}, line {line}: not UTF-8 text (byte {bad!r} at column {column})") from None


def _parse_json(path, text: str, line_number: int | None = None):
    """``json.loads(text)``; a ValueError naming ``path`` and the line (``line_number`` for one
    line of a JSONL file, else the line within ``text``) when it is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = err.lineno if line_number is None else line_number
        raise ValueError(f"{path}, line {line}: not valid JSON ({err.msg} at column {err.colno})") from err


def read_json_list(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The objects of a JSON file holding one list of objects (the authors' ``.json`` data)."""
    with _open_bytes(path) as f:
        rows = _parse_json(path, _decode(path, f.read()))
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, item {i}: expected a JSON object, got {type(row).__name__}")
    return rows[:limit] if limit is not None else rows


def read_rows(source: str | os.PathLike, split: str = "train", limit: int | None = None) -> list[dict]:
    """Rows (dicts) of ``source``: a local JSONL file (or a ``.json`` list of objects), or else a
    ``datasets`` hub name, ``"name"`` or ``"name:config"`` (e.g. ``"openai/gsm8k:main"``), read
    with ``load_dataset(name, config, split=split)`` (``split`` is ignored for a local file).

    ``limit`` keeps the first rows only. A bad JSONL line raises ValueError naming file and line.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if _is_local(source):
        if not Path(source).is_file():
            raise FileNotFoundError(f"no such file: {source}")
        if data_suffix(source) == ".json":
            return read_json_list(source, limit)
        return read_jsonl(source, limit)
    from datasets import load_dataset

    name, _, config = str(source).partition(":")
    dataset = load_dataset(name, config or None, split=split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [dict(row) for row in dataset]


# ---------------------------------------------------------------------------------------------
# Records.

# Our field names, and the authors' (input = question, output = response, instruction = the
# system prompt of the task; a score >= 7 means the response is correct).
CORRECT_SCORE = 7


@dataclass
class NLFTRecord:
    """One response to train on.

    question: the task; response: the model's response (the tokens that are trained);
    answer: the standard (reference) solution, shown in the standard view; judgment: what is
    wrong with the response, shown in the judge view (needed when ``correct`` is False);
    correct: whether the response is correct; instruction: an optional system prompt of the
    task, used instead of ``PromptTemplates.instruction``.
    """

    question: str
    response: str
    answer: str
    judgment: str | None = None
    correct: bool = True
    instruction: str | None = None


def _text(row: dict, names: tuple[str, ...], where: str, required: bool = True) -> str | None:
    """The first of ``names`` present in ``row`` (None/"" count as absent), as a string."""
    for name in names:
        value = row.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        return value
    if required:
        wanted = " or ".join(repr(n) for n in names)
        raise ValueError(f"{where}: missing field {wanted} (fields present: {sorted(row)})")
    return None


def _correct(row: dict, judgment: str | None, where: str) -> bool:
    """``correct`` (bool), else ``score >= 7``, else (the authors' rule) no judgment means correct."""
    if row.get("correct") is not None:
        value = row["correct"]
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{where}: field 'correct' must be a bool, got {value!r}")
    if row.get("score") is not None:
        score = row["score"]
        try:
            return float(score) >= CORRECT_SCORE
        except (TypeError, ValueError):
            raise ValueError(f"{where}: field 'score' must be a number, got {score!r}") from None
    if "output" in row or "input" in row:
        return judgment is None
    raise ValueError(f"{where}: missing field 'correct' or 'score' (fields present: {sorted(row)})")


def record_from_row(row: dict, where: str = "row") -> NLFTRecord:
    """An :class:`NLFTRecord` from a dict with our field names (question, response, answer,
    judgment, correct or score) or the authors' (input, output, instruction, answer, judgment,
    score). ``where`` names the row in error messages (e.g. ``"data.jsonl, line 3"``)."""
    question = _text(row, ("question", "input"), where)
    response = _text(row, ("response", "output"), where)
    answer = _text(row, ("answer",), where)
    judgment = _text(row, ("judgment",), where, required=False)
    instruction = _text(row, ("instruction",), where, required=False)
    correct = _correct(row, judgment, where)
    if not correct and judgment is None:
        raise ValueError(f"{where}: the response is marked wrong but has no 'judgment' (the judge view needs one)")
    return NLFTRecord(question, response, answer, judgment, correct, instruction)


def load_records(source: str | os.PathLike, split: str = "train", limit: int | None = None) -> list[NLFTRecord]:
    """The :class:`NLFTRecord` s of a JSONL file or ``datasets`` hub name (see :func:`read_rows`
    and :func:`record_from_row`). Errors name the file and 1-based line (the row for the hub).
    Rows with an ``error`` (records `nlft judge` could not judge) are skipped with a warning."""
    local = _is_local(source)
    records: list[NLFTRecord] = []
    jsonl = local and data_suffix(source) != ".json"
    if jsonl:
        if not Path(source).is_file():
            raise FileNotFoundError(f"no such file: {source}")
        numbered = read_numbered_jsonl(source, limit)
    else:
        numbered = enumerate(read_rows(source, split, limit))
    unjudged = 0
    for number, row in numbered:
        if row.get("error"):  # `nlft judge` could not judge it: no verdict to train on
            unjudged += 1
            continue
        if jsonl:
            where = f"{source}, line {number}"
        else:
            where = f"{source}, item {number}" if local else f"{source} ({split}), row {number}"
        records.append(record_from_row(row, where))
    if unjudged:
        warnings.warn(
            f"{source}: {unjudged} rows skipped: the judge gave them an error, not a verdict "
            "(rerun `nlft judge` with the same --out to retry them)",
            stacklevel=2,
        )
    return records


def save_records(path: str | os.PathLike, records: Iterable[NLFTRecord]) -> None:
    """Write ``records`` as JSONL with our field names (question, response, answer, judgment,
    correct; instruction when set), readable by :func:`load_records`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            row = asdict(record)
            if row["instruction"] is None:
                del row["instruction"]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Prompt views and their alignment.

VIEWS = ("base", "standard", "judge")


@dataclass(frozen=True)
class PromptTemplates:
    """The prompts of the three views, as ``str.format`` templates over ``{instruction}``,
    ``{question}``, ``{answer}`` and ``{judgment}``: a system part and a user part each.

    With a chat template, the tokenizer renders ``[system, user]`` messages (system left out
    when ``None`` or the template is empty) plus the generation prompt; without one, the text
    is ``system + sep + user + response_prefix``. ``instruction`` is the task's system prompt
    used when a record has none. Wording of the standard and judge views: the spec's.
    """

    instruction: str = "Solve the problem step by step and give the final answer."
    base_system: str | None = "{instruction}"
    base_user: str = "{question}"
    standard_system: str | None = (
        "You are an expert. The question and its standard answer are given below. "
        "Refer to the standard answer and give your answer.\n\n{instruction}"
    )
    standard_user: str = "### Question:\n{question}\n\n### Standard answer:\n{answer}"
    judge_system: str | None = (
        "Write a bad response to the question. Your response should have the weaknesses named "
        "in the judgment below.\n\n{instruction}"
    )
    judge_user: str = "### Question:\n{question}\n\n### Judgment:\n{judgment}"
    sep: str = "\n\n"
    response_prefix: str = "\n\n### Response:\n"

    def messages(self, view: str, record: NLFTRecord) -> list[dict[str, str]]:
        """The chat messages of ``view`` for ``record`` (a correct record's judge view is its base view)."""
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        if view == "judge" and record.judgment is None:
            view = "base"
        fields = {
            "instruction": record.instruction or self.instruction,
            "question": record.question,
            "answer": record.answer,
            "judgment": record.judgment or "",
        }
        system, user = getattr(self, f"{view}_system"), getattr(self, f"{view}_user")
        out = []
        if system is not None and system.format(**fields).strip():
            out.append({"role": "system", "content": system.format(**fields)})
        out.append({"role": "user", "content": user.format(**fields)})
        return out

    def render(self, view: str, record: NLFTRecord, tokenizer) -> str:
        """The prompt text of ``view``: through the tokenizer's chat template when it has one."""
        messages = self.messages(view, record)
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.sep.join(m["content"] for m in messages) + self.response_prefix


DEFAULT_TEMPLATES = PromptTemplates()


def _prompt_ids(text: str, tokenizer) -> list[int]:
    """Token ids of a rendered prompt: a chat template writes its own special tokens; plain
    text gets the tokenizer's (BOS) but never a trailing EOS."""
    with_specials = not getattr(tokenizer, "chat_template", None)
    ids = list(tokenizer(text, add_special_tokens=with_specials)["input_ids"])
    if with_specials and ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids.pop()
    return ids


def response_ids(response: str, tokenizer, add_eos: bool = True) -> list[int]:
    """The response's tokens, tokenised on their own (so that they are the same tokens after
    every prompt: no BPE merge across the prompt boundary), then EOS when ``add_eos``."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_record(
    record: NLFTRecord,
    tokenizer,
    templates: PromptTemplates = DEFAULT_TEMPLATES,
    max_length: int | None = None,
    add_eos: bool = True,
) -> dict | None:
    """The three views of ``record`` as token ids, aligned on the response.

    Each view is ``prompt_v + response[:R]``: the response tokens are the same list in every
    view; its row ``r`` (predicting ``labels[r]``) sits at position ``len(prompt_v) - 1 + r``.
    Truncation: every view fits ``max_length`` tokens by keeping the response's first
    ``R = min(n, max_length - longest prompt)`` tokens (the same R in every view; prompts are
    never cut). Returns None when no response token fits.

    Returns ``{v}_input_ids`` (list[int]) and ``{v}_prompt_length`` (int) per view, ``labels``
    (list[int], R) and ``correct`` (bool).
    """
    if not record.correct and record.judgment is None:
        raise ValueError("a wrong record needs a judgment: the judge view shows it")
    prompts = {v: _prompt_ids(templates.render(v, record, tokenizer), tokenizer) for v in VIEWS}
    if any(not ids for ids in prompts.values()):
        raise ValueError("a prompt view rendered to no tokens: the first response token would have no predictor")
    labels = response_ids(record.response, tokenizer, add_eos)
    if max_length is not None:
        labels = labels[: max(0, max_length - max(len(ids) for ids in prompts.values()))]
    if not labels:
        return None
    out: dict = {"labels": labels, "correct": bool(record.correct)}
    for view, ids in prompts.items():
        out[f"{view}_input_ids"] = ids + labels
        out[f"{view}_prompt_length"] = len(ids)
    return out


def encode_records(
    records: Sequence[NLFTRecord],
    tokenizer,
    templates: PromptTemplates = DEFAULT_TEMPLATES,
    max_length: int | None = None,
    add_eos: bool = True,
) -> list[dict]:
    """:func:`encode_record` of every record; records whose prompts leave no room for a
    response token within ``max_length`` are dropped, and responses cut to fit it are
    truncated (their first tokens kept), each with a warning that counts them."""
    encoded = [encode_record(r, tokenizer, templates, max_length, add_eos) for r in records]
    kept = [e for e in encoded if e is not None]
    if max_length is not None:
        cut = sum(
            len(e["labels"]) < len(response_ids(r.response, tokenizer, add_eos))
            for r, e in zip(records, encoded, strict=True)
            if e is not None
        )
        if cut:
            warnings.warn(
                f"{cut} of {len(kept)} responses truncated to fit max_length={max_length} tokens "
                "(prompt + response; their first tokens are kept)",
                stacklevel=2,
            )
    if len(kept) < len(encoded):
        warnings.warn(
            f"{len(encoded) - len(kept)} of {len(encoded)} records dropped: their prompts leave no room "
            f"for a response token within max_length={max_length}",
            stacklevel=2,
        )
    return kept


def pad_token_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out either way)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


@dataclass
class NLFTCollator:
    """Pads encoded records (:func:`encode_record`) into a batch; right padding, so that every
    real token keeps its position.

    Output, for each view ``v`` in (base, standard, judge), with B records, L_v the longest
    view ``v`` in the batch and R the longest (truncated) response:

    - ``{v}_input_ids``: [B, L_v] int64, padded with ``pad_token_id``;
    - ``{v}_attention_mask``: [B, L_v] int64, 1 on real tokens;
    - ``{v}_rows``: [B, R] int64, the position in view ``v`` whose hidden state predicts
      response token ``r`` (``prompt_length_v - 1 + r``; 0 on padding);
    - ``labels``: [B, R] int64, the response tokens, ``ignore_index`` (-100) on padding;
    - ``correct``: [B] bool.

    So ``hidden_v.gather(1, rows_v)`` puts, in row ``[b, r]`` of every view, the state that
    predicts ``labels[b, r]``.
    """

    pad_token_id: int
    ignore_index: int = -100
    pad_to_multiple_of: int | None = None

    def _length(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else -(-n // m) * m

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Batch of ``features`` (dicts from :func:`encode_record`); see the class docstring."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        batch_size = len(features)
        n_rows = max(len(f["labels"]) for f in features)
        labels = torch.full((batch_size, n_rows), self.ignore_index, dtype=torch.int64)
        for b, f in enumerate(features):
            labels[b, : len(f["labels"])] = torch.as_tensor(f["labels"], dtype=torch.int64)
        batch = {"labels": labels, "correct": torch.tensor([bool(f["correct"]) for f in features])}
        steps = torch.arange(n_rows, dtype=torch.int64)
        for view in VIEWS:
            length = self._length(max(len(f[f"{view}_input_ids"]) for f in features))
            ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.int64)
            mask = torch.zeros((batch_size, length), dtype=torch.int64)
            rows = torch.zeros((batch_size, n_rows), dtype=torch.int64)
            for b, f in enumerate(features):
                seq = f[f"{view}_input_ids"]
                ids[b, : len(seq)] = torch.as_tensor(seq, dtype=torch.int64)
                mask[b, : len(seq)] = 1
                n = len(f["labels"])
                rows[b, :n] = f[f"{view}_prompt_length"] - 1 + steps[:n]
            batch[f"{view}_input_ids"], batch[f"{view}_attention_mask"], batch[f"{view}_rows"] = ids, mask, rows
        return batch
