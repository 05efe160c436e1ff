"""The resumable JSONL output (nlft_kernels.recipes.jsonl_store): keys from the input's content, resume
after the input was edited, one writer per file (a second real process is refused), a kill -9 in the
middle of a write, files of another kind or owner, and the output path checked before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nlft_kernels.recipes.errors import BadInput
from nlft_kernels.recipes.jsonl_store import JsonlStore, OutputBusy, check_output_path, content_key, content_keys

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("question", "response")


def store(path: Path, owner: str = "rule") -> JsonlStore:
    return JsonlStore(path, kind="the test", owner_field="judge", owner=owner, owner_label="judged by")


def inputs(n: int) -> list[dict]:
    return [{"question": f"q{i}", "response": f"r{i}"} for i in range(n)]


def produce(path: Path, rows: list[dict], error_on: set[int] = frozenset(), owner: str = "rule"):
    """What a command does: open against the rows' keys, append a row per key not done, close."""
    keys = content_keys(rows, FIELDS)
    with store(path, owner) as out:
        resume = out.open(keys, refresh={k: {"line": i + 1} for i, k in enumerate(keys)})
        for i, (key, row) in enumerate(zip(keys, rows, strict=True)):
            if key not in resume.done:
                extra = {"error": "boom"} if i in error_on else {"correct": True}
                out.append({"id": key, "line": i + 1, **row, "judge": owner, **extra})
    return resume


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_keys_follow_content_not_position():
    rows = inputs(3)
    keys = content_keys(rows, FIELDS)
    assert len(set(keys)) == 3
    assert content_keys(rows[::-1], FIELDS) == keys[::-1]  # moved lines keep their keys
    assert content_keys([rows[0], {**rows[1], "response": "edited"}], FIELDS)[1] != keys[1]
    assert content_keys([rows[0], {**rows[0], "other": 1}], FIELDS) == [keys[0], keys[0] + "-2"]  # a repeat
    assert content_key(["a", None]) != content_key(["a", ""])  # a missing field is not an empty one


def test_resume_after_the_input_was_edited_keeps_exactly_the_current_rows(tmp_path):
    """The issue's case: 3 lines, one response changed and one line deleted, then resumed: the
    output holds the 2 current rows, none of the 2 stale ones, with their current line numbers."""
    out = tmp_path / "out.jsonl"
    rows = inputs(3)
    produce(out, rows)
    edited = [{**rows[0], "response": "changed"}, rows[2]]  # line 1 edited, line 2 deleted
    resume = produce(out, edited)
    assert (resume.kept, resume.stale, len(resume.done)) == (1, 2, 1)
    written = read(out)
    assert [(r["question"], r["response"], r["line"]) for r in written] == [("q2", "r2", 2), ("q0", "changed", 1)]
    assert sorted(r["id"] for r in written) == sorted(content_keys(edited, FIELDS))


def test_error_rows_are_retried_and_replaced(tmp_path):
    out = tmp_path / "out.jsonl"
    rows = inputs(3)
    first = produce(out, rows, error_on={1})
    assert not first.done and [("error" in r) for r in read(out)] == [False, True, False]
    second = produce(out, rows)
    assert len(second.done) == 2 and second.retry == {content_keys(rows, FIELDS)[1]}
    written = read(out)  # the error row superseded by its retry: dropped at close
    assert len(written) == 3 and not any("error" in r for r in written)


def test_duplicated_rows_of_two_writers_are_dropped(tmp_path):
    """A file two unlocked writers filled (issue 23's 36 duplicated keys): one row per key remains."""
    out = tmp_path / "out.jsonl"
    rows = inputs(2)
    produce(out, rows)
    out.write_text(out.read_text() * 2)
    resume = produce(out, rows)
    assert resume.kept == 2 and len(read(out)) == 2


def test_a_cut_last_line_is_removed_and_a_whole_one_gets_its_newline(tmp_path):
    out = tmp_path / "out.jsonl"
    rows = inputs(3)
    produce(out, rows)
    text = out.read_text()
    lines = text.splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[2][:25])
    resume = produce(out, rows)
    assert resume.repaired and resume.kept == 2 and out.read_text() == text
    out.write_text(text[:-1])
    resume = produce(out, rows)
    assert not resume.repaired and resume.kept == 3 and out.read_text() == text


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"question": "q"}\n', "no 'id' and 'judge': not an output of the test"),
        ('{"id": "x", "judge": "rule"}\nhalf a li', "not valid JSON"),
        ("just text", "not valid JSON"),
        ('{"id": "x", "judge": "rule"}\n\xff\n', "not UTF-8"),
        ('{"id": "x", "judge": "gpt"}\n', "line 1: judged by 'gpt', not 'rule'; resuming would mix the two"),
    ],
)
def test_files_of_another_kind_or_owner_are_refused_untouched(tmp_path, text, message):
    out = tmp_path / "out.jsonl"
    out.write_bytes(text.encode("latin-1"))
    with pytest.raises(BadInput, match=message):
        store(out).open([])
    assert out.read_bytes() == text.encode("latin-1") and not store(out).lock_path.exists()
    resume = store(out).open([], overwrite=True)  # starting afresh is fine
    assert resume.kept == 0 and out.read_text() == ""


@pytest.mark.parametrize("where", ["directory", "under a file", "proc"])
def test_an_unusable_output_path_is_bad_input_before_any_work(tmp_path, where):
    (tmp_path / "file").write_text("x")
    path = {"directory": tmp_path, "under a file": tmp_path / "file" / "out.jsonl", "proc": Path("/proc/out.jsonl")}
    message = {"directory": "is a directory", "under a file": "is a file, not a folder", "proc": "cannot be written"}
    if where != "proc":
        with pytest.raises(BadInput, match=message[where]):
            check_output_path(path[where])
    with pytest.raises(BadInput, match=message[where]) as info:
        store(path[where]).open([])
    assert "\n" not in str(info.value)


_WRITER = """
import sys, time
from nlft_kernels.recipes.jsonl_store import JsonlStore
out = JsonlStore(sys.argv[1], kind="the test", owner_field="judge", owner="rule")
out.open([str(i) for i in range(100000)])
print("locked", flush=True)
row = {"judge": "rule", "text": "x" * int(sys.argv[2])}
for i in range(100000):
    out.append({"id": str(i), **row})
    print(i, flush=True)
    time.sleep(float(sys.argv[3]))
"""


def _writer(path: Path, row_bytes: int, pause: float) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(row_bytes), str(pause)],
                               cwd=REPO, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    """Another real process holds the lock: opening the same file fails, naming it and the pid, and
    leaves it alone; once that process is gone (killed: the kernel drops its lock) it opens."""
    out = tmp_path / "out.jsonl"
    process = _writer(out, 10, 0.05)
    assert process.stdout.readline().strip() == "0"  # its first row is written
    try:
        with pytest.raises(OutputBusy, match=rf"{out} is being written by another process \(pid {process.pid}\)"):
            store(out).open([str(i) for i in range(10)])
    finally:
        process.kill()
        process.wait()
    resume = store(out).open([str(i) for i in range(100000)])
    assert resume.kept == len(read(out)) > 0


def test_kill_9_mid_write_leaves_a_readable_file(tmp_path):
    """Rows of 1 MB, SIGKILL while they are written: every row the writer reported is in the file,
    and the next open leaves only whole rows (at most the one being written is lost)."""
    out = tmp_path / "out.jsonl"
    process = _writer(out, 1 << 20, 0.0)
    reported = [int(process.stdout.readline()) for _ in range(3)]
    time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    data = out.read_bytes()
    whole = data.count(b"\n")  # the rows written to their newline
    resume = store(out).open([str(i) for i in range(100000)])
    rows = read(out)
    print(f"killed after {whole} whole rows; a cut last line: {resume.repaired}")
    assert [r["id"] for r in rows] == [str(i) for i in range(len(rows))]
    assert len(rows) == whole >= reported[-1] + 1 and resume.kept == len(rows)
    assert resume.repaired == (not data.endswith(b"\n"))  # the row being written, if cut, is what was lost
    assert all(len(r["text"]) == 1 << 20 for r in rows)
