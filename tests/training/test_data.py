"""Records, prompt views, their alignment on the response, and the collator."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from nlft_kernels.training.data import (
    VIEWS,
    NLFTCollator,
    NLFTRecord,
    PromptTemplates,
    encode_record,
    encode_records,
    load_records,
    read_rows,
    response_ids,
    save_records,
)
from tests._tiny import tiny_records, tiny_tokenizer


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# Rows and records


def test_read_rows_jsonl_limit_and_bad_line(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)]
    path = _write(tmp_path / "d.jsonl", rows)
    assert read_rows(path) == rows
    assert read_rows(str(path), limit=2) == rows[:2]
    bad = _write(tmp_path / "bad.jsonl", [rows[0], "", '{"question": "q1", ', rows[1]])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3"):
        read_rows(bad)
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        read_rows(_write(tmp_path / "list.jsonl", ["[1, 2]"]))


@pytest.mark.parametrize(
    ("source", "name", "config"), [("openai/gsm8k:main", "openai/gsm8k", "main"), ("me/set", "me/set", None)]
)
def test_read_rows_hub_name(source, name, config, monkeypatch):
    """A name that is not a local file goes to datasets.load_dataset, with ``name:config``."""
    import datasets

    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(4)]
    calls = []

    def fake_load_dataset(path, config_name=None, *, split):
        calls.append((path, config_name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert read_rows(source, split="test", limit=3) == rows[:3]
    assert calls == [(name, config, "test")]


def test_load_records_our_fields_and_score(tmp_path):
    rows = [
        {"question": "q0", "response": "r0", "answer": "a0", "correct": True},
        {"question": "q1", "response": "r1", "answer": "a1", "judgment": "j1", "correct": False},
        {"question": "q2", "response": "r2", "answer": "a2", "judgment": "j2", "score": 7},
        {"question": "q3", "response": "r3", "answer": "a3", "judgment": "j3", "score": 6.5},
    ]
    records = load_records(_write(tmp_path / "d.jsonl", rows))
    assert [r.correct for r in records] == [True, False, True, False]
    assert [r.question for r in records] == ["q0", "q1", "q2", "q3"]
    assert records[1].judgment == "j1" and records[0].judgment is None


def test_load_records_authors_fields(tmp_path):
    rows = [
        {"id": 0, "instruction": "sys", "input": "q0", "output": "r0", "judgment": "j0", "answer": "a0", "score": 3},
        {"id": 1, "instruction": "sys", "input": "q1", "output": "r1", "judgment": "j1", "answer": "a1", "score": 9},
        {"id": 2, "instruction": "sys", "input": "q2", "output": "r2", "judgment": "", "answer": "a2"},
        {"id": 3, "instruction": "sys", "input": "q3", "output": "r3", "judgment": "j3", "answer": "a3"},
    ]
    records = load_records(_write(tmp_path / "authors.jsonl", rows))
    assert [r.correct for r in records] == [False, True, True, False]
    assert records[0] == NLFTRecord("q0", "r0", "a0", "j0", False, "sys")
    # the authors' files are .json lists
    (tmp_path / "authors.json").write_text(json.dumps(rows, indent=2))
    assert load_records(tmp_path / "authors.json") == records
    del rows[1]["output"]
    (tmp_path / "authors.json").write_text(json.dumps(rows, indent=2))
    with pytest.raises(ValueError, match=r"authors\.json, item 1: missing field 'response' or 'output'"):
        load_records(tmp_path / "authors.json")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "q", "answer": "a", "correct": True}, r"line 2: missing field 'response' or 'output'"),
        ({"response": "r", "answer": "a", "correct": True}, r"line 2: missing field 'question' or 'input'"),
        ({"question": "q", "response": "r", "correct": True}, r"line 2: missing field 'answer'"),
        ({"question": "q", "response": "r", "answer": "a"}, r"line 2: missing field 'correct' or 'score'"),
        ({"question": "q", "response": "r", "answer": "a", "correct": False}, r"line 2: .*no 'judgment'"),
        ({"question": "q", "response": "r", "answer": "a", "correct": "maybe"}, r"line 2: field 'correct'"),
        ({"question": "q", "response": 3, "answer": "a", "correct": True}, r"line 2: field 'response' must be"),
    ],
)
def test_load_records_errors_name_the_line(tmp_path, row, message):
    good = {"question": "q", "response": "r", "answer": "a", "correct": True}
    with pytest.raises(ValueError, match=message):
        load_records(_write(tmp_path / "d.jsonl", [good, row]))


def test_save_load_roundtrip(tmp_path):
    records = tiny_records() + [replace(tiny_records()[0], instruction="Be brief.")]
    save_records(tmp_path / "out" / "r.jsonl", records)
    assert load_records(tmp_path / "out" / "r.jsonl") == records


# ---------------------------------------------------------------------------------------------
# Prompt views and alignment


def _check_alignment(enc: dict, labels: list[int]):
    """Exact: in every view, the token after position rows[r] is labels[r], and the response
    tokens are the same list in every view."""
    assert enc["labels"] == labels
    for view in VIEWS:
        ids, start = enc[f"{view}_input_ids"], enc[f"{view}_prompt_length"]
        rows = [start - 1 + r for r in range(len(labels))]
        assert [ids[p + 1] for p in rows] == labels
        assert ids[start:] == labels


@pytest.mark.parametrize("chat", [True, False])
def test_views_align_on_the_response(chat):
    tok = tiny_tokenizer(chat_template=chat)
    for record in tiny_records():
        enc = encode_record(record, tok)
        full = response_ids(record.response, tok)
        assert full[-1] == tok.eos_token_id
        _check_alignment(enc, full)
        lengths = [enc[f"{v}_prompt_length"] for v in VIEWS]
        # different prompt lengths: the rows are not the same positions in every view
        assert len(set(lengths[:2])) == 2
        base, standard, judge = (tok.decode(enc[f"{v}_input_ids"][: enc[f"{v}_prompt_length"]]) for v in VIEWS)
        assert record.question in base and record.answer not in base
        assert record.answer in standard
        if record.correct:
            assert judge == base
        else:
            assert record.judgment in judge and lengths[2] not in lengths[:2]
        if chat:
            assert base.startswith("<s><|system|>") and base.endswith("<|assistant|>")


def test_prompt_boundary_merge_does_not_misalign():
    """A prompt ending in the middle of a word: tokenising prompt + response as one text merges
    across the boundary; the views tokenise the response on its own and stay aligned."""
    tok = tiny_tokenizer(chat_template=False)
    templates = PromptTemplates(base_system=None, base_user="{question}", response_prefix="")
    record = NLFTRecord("Give the final answ", "er: clips 72", "#### 72", None, True)
    enc = encode_record(record, tok, templates)
    joint = tok(record.question + record.response, add_special_tokens=False)["input_ids"]
    base_prompt = enc["base_input_ids"][: enc["base_prompt_length"]]
    assert base_prompt + response_ids(record.response, tok, add_eos=False) != joint  # a merge happened
    _check_alignment(enc, response_ids(record.response, tok))


def test_truncation_keeps_the_same_first_response_tokens():
    tok = tiny_tokenizer()
    record = tiny_records()[3]  # wrong: judge and standard prompts are the longest
    enc_full = encode_record(record, tok)
    longest = max(enc_full[f"{v}_prompt_length"] for v in VIEWS)
    full = enc_full["labels"]
    for keep in (1, 5, len(full) - 1, len(full), len(full) + 3):
        enc = encode_record(record, tok, max_length=longest + keep)
        _check_alignment(enc, full[: min(keep, len(full))])
        assert max(len(enc[f"{v}_input_ids"]) for v in VIEWS) <= longest + keep
        assert all(enc[f"{v}_prompt_length"] == enc_full[f"{v}_prompt_length"] for v in VIEWS)
    assert encode_record(record, tok, max_length=longest) is None
    with pytest.warns(UserWarning, match="1 of 2 records dropped"):
        kept = encode_records([tiny_records()[0], record], tok, max_length=longest)
    assert len(kept) == 1


def test_custom_templates_are_used():
    tok = tiny_tokenizer()
    templates = PromptTemplates(standard_user="Q: {question} | REF: {answer}", base_system=None)
    record = tiny_records()[0]
    enc = encode_record(record, tok, templates)
    standard = tok.decode(enc["standard_input_ids"])
    assert f"Q: {record.question} | REF: {record.answer}" in standard
    assert "<|system|>" not in tok.decode(enc["base_input_ids"])


# ---------------------------------------------------------------------------------------------
# Collator


@pytest.mark.parametrize("multiple", [None, 8])
def test_collator_pads_and_rows_gather_the_labels(multiple):
    tok = tiny_tokenizer()
    features = encode_records(tiny_records(), tok)
    n_labels = [len(f["labels"]) for f in features]
    assert len(set(n_labels)) > 1  # responses of different lengths: padding of labels is exercised
    batch = NLFTCollator(tok.pad_token_id, pad_to_multiple_of=multiple)(features)
    size, rows = len(features), max(n_labels)
    assert batch["labels"].shape == (size, rows) and batch["labels"].dtype == torch.int64
    assert batch["correct"].tolist() == [f["correct"] for f in features] and batch["correct"].dtype == torch.bool
    valid = batch["labels"] != -100
    assert valid.sum(1).tolist() == n_labels
    for view in VIEWS:
        ids, mask, view_rows = (batch[f"{view}_{k}"] for k in ("input_ids", "attention_mask", "rows"))
        lengths = [len(f[f"{view}_input_ids"]) for f in features]
        assert ids.shape[1] == (max(lengths) if multiple is None else -(-max(lengths) // multiple) * multiple)
        assert mask.sum(1).tolist() == lengths
        assert bool((ids[mask == 0] == tok.pad_token_id).all())
        assert view_rows.shape == (size, rows) and view_rows.dtype == torch.int64
        predicted = ids.gather(1, view_rows + 1)
        assert torch.equal(predicted[valid], batch["labels"][valid])
        assert bool(mask.gather(1, view_rows + 1)[valid].all())
