"""Issue 23's faults of the ``nlft`` command, each run as the real process (``python -m
nlft_kernels``) on a tiny random Llama saved to a folder: exit statuses (0, 1, 2, 3, 130), --out
checked before any work, Ctrl-C during ``generate`` and its resume, an existing --out resumed or
refused, prompts beyond the model's context, YAML configs, and messages that name the field, the
file and the line."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from nlft_kernels.recipes.cli import parse_args
from nlft_kernels.recipes.errors import BadInput
from tests._cli import REPO, nlft_command, nlft_env, nlft_error, nlft_ok, not_progress, run_nlft, write_jsonl
from tests._tiny import save_tiny_model, tiny_records

# Short questions with their answers.
MANY = [{"question": f"Tom has {i} apples and buys {i + 3} more. How many?", "answer": f"#### {2 * i + 3}"}
        for i in range(40)]  # fmt: skip
NO_MODEL = "/no/such/model"  # a run that got past --out would stop here instead


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def records_file(path: Path) -> Path:
    rows = [{"question": r.question, "response": r.response, "answer": r.answer, "judgment": r.judgment,
             "correct": r.correct} for r in tiny_records()]  # fmt: skip
    return write_jsonl(path, rows)


# --------------------------------------------------------------------------- an unusable --out


def _unusable(kind: str, tmp_path: Path) -> Path:
    if kind == "a folder":
        (tmp_path / "folder").mkdir()
        return tmp_path / "folder"
    if kind == "a file":
        (tmp_path / "file.txt").write_text("x")
        return tmp_path / "file.txt"
    if kind == "under a file":
        (tmp_path / "file.txt").write_text("x")
        return tmp_path / "file.txt" / "out"
    return Path("/proc/nlft-test/out")


@pytest.mark.parametrize(
    "command, kind, message",
    [
        ("generate", "a folder", "is a directory: name a file"),
        ("generate", "under a file", "file.txt is a file, not a folder"),
        ("generate", "/proc", "cannot be written (/proc:"),
        ("eval", "a folder", "is a directory: name a file"),
        ("train", "a file", "is a file; name a folder"),
        ("saliency", "under a file", "file.txt is a file, not a folder"),
        ("demo", "/proc", "cannot be written (/proc:"),
    ],
)
def test_unusable_out_is_refused_before_any_work(command, kind, message, tmp_path):
    """Exit 2 with one line naming --out, before the model loads (the model named cannot even be
    found): so no response is ever generated for an output that cannot take it."""
    out = _unusable(kind, tmp_path)
    inputs = {"train": ["--data", records_file(tmp_path / "r.jsonl")],
              "saliency": ["--data", records_file(tmp_path / "r.jsonl")],
              "generate": ["--data", write_jsonl(tmp_path / "q.jsonl", MANY)],
              "eval": ["--data", write_jsonl(tmp_path / "q.jsonl", MANY)]}.get(command, [])  # fmt: skip
    line = nlft_error(command, "--model", NO_MODEL, *inputs, "--out", out)
    assert line.startswith(f"nlft {command}: error: --out {out}") and message in line, line
    assert not (tmp_path / "folder").exists() or not any((tmp_path / "folder").iterdir())


# ----------------------------------------------------------------------- exit statuses 1 and 3


def test_strict_is_exit_3_and_a_finished_run_0(tmp_path):
    hook = tmp_path / "flaky.py"
    hook.write_text("def judge(question, response, reference):\n"
                    "    if response == 'boom':\n        raise RuntimeError('judge bug')\n"
                    "    return True, None\n")  # fmt: skip
    rows = [{"question": "q", "answer": "#### 1", "response": r} for r in ("1", "boom")]
    responses = write_jsonl(tmp_path / "responses.jsonl", rows)
    argv = ["judge", "--in", responses, "--out", tmp_path / "records.jsonl", "--judge", f"{hook}:judge"]
    nlft_ok(*argv, allowed=("1 of 2 records have an error instead of a verdict",))
    done = run_nlft(*argv, "--strict")
    assert done.returncode == 3, done.stderr
    assert "nlft judge: error: --strict: 1 of 2 records have an error" in not_progress(done.stderr)[-1]


def test_unreachable_judge_is_exit_1(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the test runs the command: connection refused
    responses = write_jsonl(tmp_path / "responses.jsonl", [{"question": "q", "answer": "#### 1", "response": "1"}])
    line = nlft_error("judge", "--in", responses, "--out", tmp_path / "records.jsonl", "--base-url",
                      f"http://127.0.0.1:{port}/v1", "--model", "m", "--max-retries", "0", status=1)  # fmt: skip
    assert "cannot reach the judge" in line and "rerun to resume" in line


# ------------------------------------------------------------------- Ctrl-C and resume in generate


def test_ctrl_c_during_generate_keeps_finished_rows_and_resumes(model_dir, tmp_path):
    """SIGINT mid-run: exit 130 with one line saying where the rows are; every finished row is on
    disk, whole; the same command then generates only the rest, and the file equals what one
    uninterrupted run writes."""
    questions = MANY[:12]
    data = write_jsonl(tmp_path / "questions.jsonl", questions)
    out = tmp_path / "responses.jsonl"
    argv = ["generate", "--model", model_dir, "--data", data, "--samples", len(questions), "--batch-size", "1",
            "--max-new-tokens", "48", "--out", out]  # fmt: skip
    process = subprocess.Popen(nlft_command(*argv), cwd=REPO, env=nlft_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 600  # a loaded machine starts python slowly
    while time.monotonic() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert not_progress(err) == [f"nlft generate: interrupted; the responses generated so far are in {out}: "
                                 "rerun to resume"]  # fmt: skip
    kept = read_jsonl(out)  # every line whole: flushed per batch
    assert 2 <= len(kept) < len(questions), "the run was not interrupted mid-way"

    done = nlft_ok(*argv)
    assert f"resumed: {len(kept)} of {len(questions)} responses were already in {out}" in done.stdout
    final = read_jsonl(out)
    assert final[: len(kept)] == kept and len({r["id"] for r in final}) == len(questions)
    fresh = tmp_path / "fresh.jsonl"
    nlft_ok(*argv[:-1], fresh)
    by_id = {r["id"]: r for r in read_jsonl(fresh)}
    assert {r["id"]: r for r in final} == by_id  # greedy, batches of one: the same responses


def test_existing_out_is_resumed_refused_or_overwritten(model_dir, tmp_path):
    """An --out of another kind, or generated with other settings, is refused and left as it was;
    --overwrite starts it afresh; edited and dropped questions are generated again, their old
    rows dropped (and said so)."""
    data = write_jsonl(tmp_path / "questions.jsonl", MANY[:3])
    out = tmp_path / "responses.jsonl"
    base = ["generate", "--model", model_dir, "--data", data, "--max-new-tokens", "4", "--out", out]
    out.write_text('{"question": "q", "answer": "a"}\n')
    assert "line 1: no 'id' and 'generation': not an output of `nlft generate`" in nlft_error(*base)
    assert out.read_text() == '{"question": "q", "answer": "a"}\n'
    nlft_ok(*base, "--overwrite")
    first = read_jsonl(out)
    assert len(first) == 3
    before = out.read_bytes()
    line = nlft_error(*base[:-4], "--max-new-tokens", "5", "--out", out)
    assert "'max_new_tokens': 4" in line and "'max_new_tokens': 5" in line and "--overwrite" in line
    assert out.read_bytes() == before

    edited = [MANY[0], {"question": "A new question?", "answer": "#### 1"}]  # MANY[1] edited, MANY[2] dropped
    write_jsonl(data, edited)
    done = nlft_ok(*base)
    assert f"{out}: dropped 2 rows of questions no longer asked" in done.stdout
    assert "resumed: 1 of 2 responses were already in" in done.stdout
    final = read_jsonl(out)
    assert final[0] == first[0] and [r["question"] for r in final] == [MANY[0]["question"], "A new question?"]


def test_one_writer_per_out(tmp_path):
    """--out held by another writer (here this test, through the same store): exit 2 naming it."""
    from nlft_kernels.recipes.jsonl_store import JsonlStore

    out = tmp_path / "responses.jsonl"
    data = write_jsonl(tmp_path / "questions.jsonl", MANY[:2])
    with JsonlStore(out, kind="`nlft generate`", owner_field="generation", owner={}) as store:
        store.open([])
        line = nlft_error("generate", "--model", NO_MODEL, "--data", data, "--out", out)
    assert f"{out} is being written by another process" in line


# ------------------------------------------------------------------ prompts beyond the context


def test_prompt_beyond_the_context(model_dir, tmp_path):
    """The tiny model reads 512 tokens: generate skips a 3000-word question, naming its row, and
    writes the others; eval refuses it (an accuracy over fewer questions would mislead)."""
    rows = [MANY[0], {"question": "How many? " + "apples " * 3000, "answer": "#### 1"}, MANY[1]]
    data = write_jsonl(tmp_path / "questions.jsonl", rows)
    out = tmp_path / "responses.jsonl"
    done = nlft_ok("generate", "--model", model_dir, "--data", data, "--max-new-tokens", "4", "--out", out)
    assert "skipped 1 questions of" in done.stdout and "row 1 (" in done.stdout
    assert "context leaves beside --max-new-tokens" in done.stdout
    assert sorted(r["index"] for r in read_jsonl(out)) == [0, 2]
    line = nlft_error("eval", "--model", model_dir, "--data", data, "--max-new-tokens", "4")
    assert "1 questions of" in line and "row 1 (" in line and "drop them from --data" in line


# ------------------------------------------------------------------------------- YAML configs


def test_config_file_and_flags_over_it(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("learning_rate: 3.0e-5\nlr_scheduler_type: cosine\nlora-r: 4\nsteps: 7\nfull: true\n"
                      "lora_targets: [q_proj, v_proj]\ncorrect_threshold: 0.9\ndata: r.jsonl\n")  # fmt: skip
    args = parse_args(["train", "--config", str(config), "--out", "m", "--lora-r", "8"])
    assert (args.learning_rate, args.lr_scheduler_type, args.max_steps, args.lora) == (3e-5, "cosine", 7, False)
    assert (args.lora_r, args.lora_targets, args.correct_threshold, args.data) == (8, ["q_proj", "v_proj"], 0.9,
                                                                                   Path("r.jsonl"))  # fmt: skip


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora_r: 4\n  bad: [\n", "line 2: not valid YAML"),
        ("lorra_r: 4\n", "unknown setting 'lorra_r' for `nlft train`"),
        ("lora_r: [1, 2]\n", "lora_r: expected one value, got a list"),
        ("learning_rate: fast\n", "learning_rate: invalid value 'fast'"),
        ("- lora_r\n", "expected 'setting: value' lines, got a list"),
    ],
)
def test_bad_config_names_file_and_setting(tmp_path, text, message):
    config = tmp_path / "train.yaml"
    config.write_text(text)
    with pytest.raises(BadInput, match="--config " + str(config).replace(".", r"\.")) as info:
        parse_args(["train", "--config", str(config), "--data", "r.jsonl", "--out", "m"])
    assert message in str(info.value)


def test_bad_config_is_exit_2_with_one_line(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("lora_r: [\n")
    line = nlft_error("train", "--config", config, "--data", "r.jsonl", "--out", tmp_path / "m")
    assert line.startswith(f"nlft train: error: --config {config}, line 2: not valid YAML")


# ------------------------------------------------------------------------------------ messages


def test_a_field_of_the_wrong_type_is_named_as_such(tmp_path):
    responses = write_jsonl(tmp_path / "responses.jsonl", [{"question": "q", "answer": "#### 1", "response": 5}])
    line = nlft_error("judge", "--in", responses, "--out", tmp_path / "records.jsonl")
    assert f"--in {responses}, line 1: field response must be a string, got int" in line
    data = write_jsonl(tmp_path / "questions.jsonl", [MANY[0], {"question": 12, "answer": "#### 1"}])
    line = nlft_error("generate", "--data", data, "--out", tmp_path / "out.jsonl")
    assert f"--data {data}, line 2: field 'question' must be a string, got int" in line


def test_invalid_utf8_names_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "#### 1", "response": "1"}).encode()
    responses = tmp_path / "responses.jsonl"
    responses.write_bytes(good + b"\n\n" + good.replace(b'"1"}', b'"caf\xe9"}') + b"\n")
    line = nlft_error("judge", "--in", responses, "--out", tmp_path / "records.jsonl")
    assert f"{responses}, line 3: not UTF-8 text (byte b'\\xe9' at column" in line
    records = tmp_path / "records.jsonl"
    records.write_bytes(b'{"question": "q\xff", "response": "r", "answer": "a", "correct": true}\n')
    line = nlft_error("train", "--data", records, "--out", tmp_path / "m")
    assert f"{records}, line 1: not UTF-8 text" in line
