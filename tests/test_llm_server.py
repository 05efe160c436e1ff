"""`nlft judge` against a real OpenAI-compatible server: llama-cpp-python's, serving the embedded
SmolLM2-135M-Instruct GGUF on a free localhost port (started once for the module, stopped at the
end). Skipped when llama-cpp-python[server] is not installed, failed then under
NLFT_REQUIRE_LLM_SERVER=1 (CI sets it). A record takes about 10 s on 2 cores (the server answers
one request at a time): 2-3 records per test and 48-64-token replies keep the file to 2-3 minutes.

A 135M model is a poor judge: what is checked is the pipeline (every record sent, answered,
parsed or recorded as an error with the raw reply, resumable), not the model's verdicts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nlft_kernels.recipes.cli import main
from nlft_kernels.recipes.data import read_gsm8k
from nlft_kernels.recipes.generation import sample_rows
from nlft_kernels.recipes.judgment import JudgeError
from nlft_kernels.recipes.llm_judge import OpenAIJudge
from tests._judge_server import LlamaServer, llama_server_or_skip

REPO = Path(__file__).resolve().parents[1]
SEED = 0  # of the GSM8K test questions drawn


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    gguf = llama_server_or_skip()
    server = LlamaServer(gguf, tmp_path_factory.mktemp("llama-server") / "server.log")
    yield server
    server.stop()


def responses_file(tmp_path: Path, n: int) -> Path:
    """n GSM8K test questions (seed SEED), answered alternately with the reference solution and a wrong one."""
    rows = []
    for k, (_, row) in enumerate(sample_rows(read_gsm8k("test"), n, SEED)):
        wrong = "I add the numbers in the question and get 7.\nThe answer is 7."
        rows.append(
            {"question": row["question"], "answer": row["answer"], "response": row["answer"] if k % 2 == 0 else wrong}
        )
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def judge_cmd(server: LlamaServer, responses: Path, out: Path, *extra: str) -> list[str]:
    return ["judge", "--in", str(responses), "--out", str(out), "--base-url", server.base_url,
            "--model", LlamaServer.MODEL, "--max-tokens", "48", "--timeout", "300", *extra]  # fmt: skip


def test_json_verdicts_from_the_server(llama_server, tmp_path, capsys):
    """With the verdict schema (llama.cpp constrains decoding to it) every reply is a JSON object."""
    print(f"seed {SEED}")
    responses, out = responses_file(tmp_path, 2), tmp_path / "records.jsonl"
    # Room for the whole object: a reply cut at --max-tokens would not parse.
    # --concurrency 1: llama-cpp-python 0.3.36's server stalled here on two requests at once.
    main(judge_cmd(llama_server, responses, out, "--response-format", "json_object", "--concurrency", "1",
                   "--max-tokens", "64"))  # fmt: skip
    rows = read_jsonl(out)
    assert sorted(r["line"] for r in rows) == [1, 2]
    for row in rows:
        assert isinstance(row["raw"], str) and row["raw"].lstrip().startswith("{"), row
        if "error" not in row:
            assert isinstance(row["correct"], bool) and (row["correct"] or row["judgment"])
    verdicts = [r for r in rows if "error" not in r]
    assert verdicts, f"no reply of the server parsed: {rows}"
    assert f"judged {len(verdicts)} responses" in capsys.readouterr().out


def test_text_replies_are_parsed_or_recorded(llama_server, tmp_path):
    """Free text from a small model: each record gets a verdict or an error carrying the raw reply."""
    responses, out = responses_file(tmp_path, 2), tmp_path / "records.jsonl"
    main(judge_cmd(llama_server, responses, out, "--concurrency", "1"))
    rows = read_jsonl(out)
    assert sorted(r["line"] for r in rows) == [1, 2]
    for row in rows:
        assert isinstance(row["raw"], str) and row["raw"].strip()
        if "error" in row:  # what the parser could not read, named, with the reply kept above
            assert any(why in row["error"] for why in ("no verdict", "no judgment", "empty")), row["error"]
        else:
            assert isinstance(row["correct"], bool) and (row["correct"] or row["judgment"])


def test_prompt_longer_than_the_context_is_an_error_on_its_record(llama_server, tmp_path):
    """The server refuses a prompt beyond its 2048-token context: that record gets the HTTP error,
    the others are judged."""
    responses, out = responses_file(tmp_path, 2), tmp_path / "records.jsonl"
    rows = [json.loads(line) for line in responses.read_text().splitlines()]
    rows[1]["response"] = "Then 1 + 1 = 2 and 2 + 2 = 4. " * 300
    responses.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(judge_cmd(llama_server, responses, out, "--response-format", "json_object", "--max-retries", "1",
                   "--concurrency", "1"))  # fmt: skip
    by_line = {r["line"]: r for r in read_jsonl(out)}
    assert "HTTP" in by_line[2]["error"] and "raw" in by_line[2]
    assert "error" not in by_line[1] or "HTTP" not in by_line[1]["error"]


def test_timeout_against_the_server(llama_server):
    judge = OpenAIJudge(llama_server.base_url, LlamaServer.MODEL, timeout=0.01, max_retries=1, backoff=0.0,
                        max_tokens=16)  # fmt: skip
    row = read_gsm8k("test", limit=1)[0]
    with pytest.raises(JudgeError, match=r"no reply within 0.01 s \(after 2 attempts\)"):
        judge(row["question"], row["answer"], row["answer"])
    time.sleep(2)  # let the server finish the abandoned requests before the next test


def test_killed_mid_run_then_resumed(llama_server, tmp_path):
    """SIGKILL after the first record arrives; the rerun judges only the rest."""
    n = 3
    responses, out = responses_file(tmp_path, n), tmp_path / "records.jsonl"
    # JSON replies: every record parses, so the rerun's exit status speaks only of the resume.
    json_replies = ("--response-format", "json_object", "--max-tokens", "64", "--concurrency", "1")
    cmd = [sys.executable, "-m", "nlft_kernels", *judge_cmd(llama_server, responses, out, *json_replies)]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not out.exists() or not out.read_text().strip()):
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    _, err = process.communicate()
    kept = read_jsonl(out)
    assert 1 <= len(kept) < n, f"not killed mid-run: {len(kept)} records, {err.decode()[-500:]}"
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed: {len(kept)} of {n} records were already judged" in done.stdout
    final = read_jsonl(out)
    assert sorted(r["line"] for r in final) == list(range(1, n + 1)) and final[: len(kept)] == kept


def test_server_stopped_mid_run(tmp_path, capsys):
    """The server goes away after the first record: `nlft judge` stops with a clear error, and
    the record judged before stays in the output."""
    server = LlamaServer(llama_server_or_skip(), tmp_path / "server.log")
    responses, out = responses_file(tmp_path, 3), tmp_path / "records.jsonl"
    first = tmp_path / "first.jsonl"
    first.write_text(responses.read_text().splitlines(keepends=True)[0])
    try:
        main(judge_cmd(server, first, out, "--concurrency", "1"))
    finally:
        server.stop()
    kept = read_jsonl(out)
    assert len(kept) == 1
    status = main(judge_cmd(server, responses, out, "--max-retries", "1", "--backoff", "0.1", "--concurrency", "1"))
    message = capsys.readouterr().err
    assert status == 1 and "cannot reach the judge" in message and "rerun to resume" in message
    assert read_jsonl(out) == kept
