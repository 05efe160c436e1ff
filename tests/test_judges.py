"""Judges behind one interface: the verdict parser, the OpenAI-compatible client against a stub
server in a thread (retries, timeouts, HTTP 500, garbage, a server that is down, the API key,
bounded concurrency), the resumable runner (kill, rerun, cut last line), the local-model judge
and ``nlft judge``'s flags. The real llama.cpp server: tests/test_llm_server.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nlft_kernels.recipes.cli import main
from nlft_kernels.recipes.judge import SCORE_CORRECT, Judgment
from nlft_kernels.recipes.judge_run import judge_rows, read_judged, record_id
from nlft_kernels.recipes.judges import (
    Judge,
    JudgeError,
    JudgeUnavailable,
    LocalModelJudge,
    OpenAIJudge,
    judge_messages,
    parse_verdict,
    rule_judge,
)
from nlft_kernels.training.data import load_records
from tests._judge_server import StubServer, chat_reply, free_port

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Janet has 16 eggs, eats 3 and bakes with 4. She sells the rest at $2 each. How much does she make?"
REFERENCE = "16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n9 * 2 = $<<9*2=18>>18\n#### 18"
WRONG = "Verdict: wrong"
REPLY_WRONG = "The step 16 - 3 = 12 is wrong: 16 - 3 is 13. The correct answer is 18.\nVerdict: wrong"
REPLY_RIGHT = "The response is correct.\nVerdict: correct"


def rows(n: int) -> list[tuple[int, dict]]:
    """n distinct (line, row) inputs: even ones right, odd ones wrong."""
    out = []
    for i in range(n):
        response = "16 - 3 - 4 = 9. 9 * 2 = 18. The answer is 18." if i % 2 == 0 else f"The answer is {20 + i}."
        out.append((i + 1, {"question": f"{QUESTION} (#{i})", "response": response, "answer": REFERENCE}))
    return out


def write_jsonl(path: Path, items) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def ok(number, body):
    """A stub that answers wrong for questions with an odd #, right otherwise."""
    odd = int(body["messages"][1]["content"].split("(#")[1].split(")")[0]) % 2
    return 200, chat_reply(REPLY_WRONG if odd else REPLY_RIGHT), 0.0


# ------------------------------------------------------------------------------ the parser


@pytest.mark.parametrize(
    "reply, correct, judgment",
    [
        (REPLY_RIGHT, True, None),
        (REPLY_WRONG, False, "The step 16 - 3 = 12 is wrong: 16 - 3 is 13. The correct answer is 18."),
        ("Judgment: Forgot the 4 muffin eggs.\n\n**Verdict:** Incorrect", False, "Forgot the 4 muffin eggs."),
        ("The response is correct.\n\n**Final Verdict**: **Correct**", True, None),
        ("Off by one.\nverdict - WRONG.", False, "Off by one."),
        ("It adds instead of subtracting. Rating: [[wrong]]", False, "It adds instead of subtracting."),
        ("### The response is correct. ###", True, None),  # the authors' judge's sentence
        ('{"judgment": "Wrong total.", "correct": false}', False, "Wrong total."),
        ('```json\n{"correct": true, "judgment": ""}\n```', True, None),
        ('Sure! {"verdict": "incorrect", "explanation": "Missed a step."}', False, "Missed a step."),
        ("The final sum is wrong.\nScore: 3/10", False, "The final sum is wrong."),
        ("All steps check out.\nScore: 9", True, None),
        ("It is not correct: 12 should be 13.\nVerdict: not correct", False, "It is not correct: 12 should be 13."),
        ("Every step checks out.\nVerdict: The response is correct.", True, None),
        ("It drops the 4 eggs.\nFinal verdict: the student's response is wrong", False, "It drops the 4 eggs."),
    ],
)
def test_parse_verdict(reply, correct, judgment):
    result = parse_verdict(reply)
    assert (result.correct, result.judgment) == (correct, judgment)
    assert result.raw == reply


@pytest.mark.parametrize(
    "reply, message",
    [
        ("", "empty"),
        ("I like turtles.", "no verdict"),
        ("<html>502 Bad Gateway</html>", "no verdict"),
        ("Verdict: wrong", "no judgment"),
        ('{"correct": false, "judgment": ""}', "no judgment"),
        ('{"judgment": "hmm"}', "no verdict"),
        ("Verdict: no errors found", "no verdict"),  # neither word: not guessed
        # the authors' sentence next to a word of blame is no verdict
        ("The response is correct in its setup, but 9*2=16 is wrong; the final answer is incorrect.", "no verdict"),
        ("The response is correct up to step 2, then it makes a mistake.", "no verdict"),
    ],
)
def test_parse_verdict_rejects(reply, message):
    with pytest.raises(JudgeError, match=message) as info:
        parse_verdict(reply)
    assert info.value.raw == reply


def test_prompt_has_question_reference_and_response():
    system, user = judge_messages("Q?", "my answer", "#### 5")
    assert "math expert" in system["content"] and "Verdict: correct" in system["content"]
    assert "### Question:\nQ?" in user["content"] and "#### 5" in user["content"] and "my answer" in user["content"]
    assert "JSON" in judge_messages("Q?", "r", "a", json_reply=True)[0]["content"]


def test_every_judge_is_a_judge():
    assert isinstance(rule_judge, Judge) and isinstance(OpenAIJudge("http://x/v1", "m"), Judge)
    assert rule_judge(QUESTION, "The answer is 18.", REFERENCE) == Judgment(True, None, SCORE_CORRECT)
    with pytest.raises(JudgeError, match="no final answer"):
        rule_judge(QUESTION, "The answer is 18.", "no number")


# ------------------------------------------------------------------- the server client


def test_reply_and_api_key(monkeypatch):
    monkeypatch.setenv("NLFT_JUDGE_API_KEY", "sk-test-123")
    with StubServer(ok) as server:
        judge = OpenAIJudge(server.base_url, "judge-model", api_key="sk-test-123", max_tokens=7)
        result = judge(f"{QUESTION} (#1)", "The answer is 21.", REFERENCE)
    assert not result.correct and result.judgment.startswith("The step 16 - 3 = 12 is wrong")
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test-123"
    body = request["body"]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("judge-model", 7, 0.0)
    assert "The answer is 21." in body["messages"][1]["content"]


@pytest.mark.parametrize("fmt, kind", [("json_object", "json_object"), ("json_schema", "json_schema")])
def test_response_formats(fmt, kind):
    body = OpenAIJudge("http://h/v1", "m", response_format=fmt).request_body([])
    assert body["response_format"]["type"] == kind and "JSON" not in str(body["messages"])


def test_http_500_is_retried_with_backoff():
    """Two 500s, then an answer: three requests, waits of about 0.05 then 0.1 s."""
    replies = iter([(500, b"overloaded", 0.0), (500, b"overloaded", 0.0), (200, chat_reply(REPLY_RIGHT), 0.0)])
    waits = []
    with StubServer(lambda n, b: next(replies)) as server:
        judge = OpenAIJudge(server.base_url, "m", max_retries=3, backoff=0.05, sleep=waits.append)
        assert judge("q", "r", "a").correct
    assert len(server.requests) == 3
    assert 0.05 <= waits[0] <= 0.055 and 0.1 <= waits[1] <= 0.11


def test_retry_after_is_capped():
    """A 429 asking for an hour waits 30 s, the backoff's cap."""
    from nlft_kernels.recipes.judges import _Retryable

    waits, replies = [], iter([_Retryable("HTTP 429", retry_after=3600.0), chat_reply(REPLY_RIGHT)])
    judge = OpenAIJudge("http://h/v1", "m", max_retries=1, sleep=waits.append)

    def post(data, headers):
        reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return json.loads(reply)["choices"][0]["message"]["content"]

    judge._post = post
    assert judge("q", "r", "a").correct and waits == [30.0]


def test_http_500_every_time_is_an_error_on_the_record():
    with StubServer(lambda n, b: (500, b"internal error", 0.0)) as server:
        judge = OpenAIJudge(server.base_url, "m", max_retries=2, backoff=0.0)
        with pytest.raises(JudgeError, match=r"HTTP 500 from the judge: internal error \(after 3 attempts\)"):
            judge("q", "r", "a")
    assert len(server.requests) == 3


def test_slow_server_times_out():
    with StubServer(lambda n, b: (200, chat_reply(REPLY_RIGHT), 1.0)) as server:
        judge = OpenAIJudge(server.base_url, "m", timeout=0.2, max_retries=1, backoff=0.0)
        started = time.monotonic()
        with pytest.raises(JudgeError, match=r"no reply within 0.2 s \(after 2 attempts\)"):
            judge("q", "r", "a")
        assert time.monotonic() - started < 1.5  # two timeouts, not two full replies
    assert len(server.requests) == 2


def test_a_reply_that_drips_times_out_in_all():
    """--timeout bounds the whole request: a body sent a byte every 20 ms (about 3 s in all, each
    read well within the timeout) ends at 0.4 s, not when the last byte comes."""
    body = chat_reply(REPLY_RIGHT)
    assert len(body) * 0.02 > 2.0, "the drip must outlast the timeout several times over"
    with StubServer(lambda n, b: (200, body, 0.0), drip=0.02) as server:
        judge = OpenAIJudge(server.base_url, "m", timeout=0.4, max_retries=0)
        started = time.monotonic()
        with pytest.raises(JudgeError, match=r"no reply within 0.4 s \(after 1 attempt\)") as info:
            judge("q", "r", "a")
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 1.5, elapsed
    assert info.value.transport and len(server.requests) == 1


@pytest.mark.parametrize(
    "body, message",
    [(b"<html>oops</html>", "not a chat completion"), (b'{"choices": []}', "not a chat completion"),
     (chat_reply("I like turtles."), "no verdict")],
)  # fmt: skip
def test_garbage_reply_is_an_error_with_the_raw_text(body, message):
    with StubServer(lambda n, b: (200, body, 0.0)) as server:
        with pytest.raises(JudgeError, match=message) as info:
            OpenAIJudge(server.base_url, "m", max_retries=2)("q", "r", "a")
    assert len(server.requests) == 1  # garbage is not retried: at temperature 0 it would come back
    assert info.value.raw and (body.decode() in info.value.raw or "turtles" in info.value.raw)


@pytest.mark.parametrize("status, message", [(401, "refused the request"), (404, "no chat completions")])
def test_auth_and_endpoint_errors_stop_at_once(status, message):
    with StubServer(lambda n, b: (status, b'{"error": "nope"}', 0.0)) as server:
        with pytest.raises(JudgeUnavailable, match=message):
            OpenAIJudge(server.base_url, "m", max_retries=3)("q", "r", "a")
    assert len(server.requests) == 1


def test_redirects_are_not_followed_with_the_api_key():
    """A server that answers 302: urllib would follow it, Authorization header and all; the judge stops."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))  # read all: no reset on close
            if self.path.endswith("/chat/completions"):
                self.send_response(302)
                self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = chat_reply(REPLY_RIGHT)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer  # noqa: N815 (http.server's names)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = OpenAIJudge(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", api_key="sk-secret")
        with pytest.raises(JudgeUnavailable, match=r"redirect \(HTTP 302\) to .*/elsewhere.*not followed"):
            judge("q", "r", "a")
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [("POST", "/v1/chat/completions", "Bearer sk-secret")]


def test_server_down():
    judge = OpenAIJudge(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=2, backoff=0.01)
    with pytest.raises(JudgeUnavailable, match=r"cannot reach the judge .*connection failed.*after 3 attempts"):
        judge("q", "r", "a")


def test_base_url_must_be_http():
    with pytest.raises(ValueError, match="http:// or https://"):
        OpenAIJudge("localhost:8000", "m")


# ---------------------------------------------------------------------------- the runner


def test_concurrency_is_bounded_and_every_record_is_written(tmp_path):
    def slow(number, body):
        return ok(number, body)[:2] + (0.15,)

    out = tmp_path / "records.jsonl"
    with StubServer(slow) as server:
        run = judge_rows(rows(9), OpenAIJudge(server.base_url, "m"), out, concurrency=3, progress=False)
    assert server.max_in_flight == 3 and len(server.requests) == 9
    assert (run.judged, run.correct, run.wrong, run.errors, run.skipped) == (9, 5, 4, 0, 0)
    written = read_jsonl(out)
    assert sorted(r["line"] for r in written) == list(range(1, 10))
    assert all(r["correct"] == (r["line"] % 2 == 1) for r in written)
    records = load_records(out)  # the trainer reads the file as written
    assert len(records) == 9 and sum(not r.correct for r in records) == 4


def test_a_judge_that_is_not_thread_safe_runs_alone(tmp_path):
    """A judge's own ``concurrency`` (LocalModelJudge's is 1) caps the runner's."""
    import threading

    threads, this_thread = [], threading.current_thread()

    class OneAtATime:
        concurrency = 1
        name = "one at a time"

        def __call__(self, question, response, reference_solution):
            threads.append(threading.current_thread())
            return rule_judge(question, response, reference_solution)

    assert LocalModelJudge.concurrency == 1
    run = judge_rows(rows(4), OneAtATime(), tmp_path / "records.jsonl", concurrency=4, progress=False)
    assert run.judged == 4 and threads == [this_thread] * 4  # concurrency 1: no worker threads


def test_errors_are_recorded_then_retried_on_rerun(tmp_path):
    """A garbage reply is an error row with the raw reply; the rerun retries only it."""
    out = tmp_path / "records.jsonl"
    garbage = {"#2)"}

    def flaky(number, body):
        if any(tag in body["messages"][1]["content"] for tag in garbage):
            return 200, chat_reply("¯\\_(ツ)_/¯"), 0.0
        return ok(number, body)

    with StubServer(flaky) as server:
        first = judge_rows(rows(4), OpenAIJudge(server.base_url, "m"), out, concurrency=2, progress=False)
        assert (first.judged, first.errors) == (3, 1)
        (error,) = [r for r in read_jsonl(out) if "error" in r]
        assert error["line"] == 3 and "no verdict" in error["error"] and error["raw"] == "¯\\_(ツ)_/¯"
        with pytest.warns(UserWarning, match="1 rows skipped"):
            assert len(load_records(out)) == 3
        garbage.clear()
        second = judge_rows(rows(4), OpenAIJudge(server.base_url, "m"), out, concurrency=2, progress=False)
    assert (second.skipped, second.judged, second.errors, second.retried) == (3, 1, 0, 1)
    assert len(server.requests) == 5
    judged, errored, _ = read_judged(out)
    assert len(judged) == 4 and not errored


def test_wrong_without_a_judgment_is_an_error_on_the_record(tmp_path):
    """A user judge (--judge mod:f) that says wrong with no judgment: an error row, which the trainer skips."""

    def terse(question, response, reference_solution):
        return Judgment("(#1)" not in question, None, 0.0)

    out = tmp_path / "records.jsonl"
    run = judge_rows(rows(2), terse, out, progress=False)
    assert (run.judged, run.errors) == (1, 1)
    (error,) = [r for r in read_jsonl(out) if "error" in r]
    assert error["line"] == 2 and "gives no judgment" in error["error"]
    with pytest.warns(UserWarning, match="1 rows skipped"):
        assert len(load_records(out)) == 1


def test_a_cut_last_line_is_removed_and_its_record_judged_again(tmp_path):
    out = tmp_path / "records.jsonl"
    judge_rows(rows(3), rule_judge, out, progress=False)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1] + lines[2][:25])  # a crash in the middle of the third write
    run = judge_rows(rows(3), rule_judge, out, progress=False)
    assert run.repaired and (run.skipped, run.judged) == (2, 1)
    assert out.read_text().splitlines(keepends=True) == lines


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    """Only the newline was lost: the row keeps its record and gets its newline back."""
    out = tmp_path / "records.jsonl"
    judge_rows(rows(3), rule_judge, out, progress=False)
    text = out.read_text()
    out.write_text(text[:-1])
    run = judge_rows(rows(3), rule_judge, out, progress=False)
    assert not run.repaired and (run.skipped, run.judged) == (3, 0)
    assert out.read_text() == text


def test_output_that_is_not_ours_is_refused_before_any_repair(tmp_path):
    """A file that is not ours, its last line without a newline, is refused and left as it was."""
    out = tmp_path / "records.jsonl"
    for text in ('{"question": "q"}\n{"question": "r"}', '{"question": "q"}\nhalf a li', "just text"):
        out.write_text(text)
        with pytest.raises(ValueError, match="not an output of `nlft judge`"):
            judge_rows(rows(1), rule_judge, out, progress=False)
        assert out.read_text() == text


def test_edited_input_is_judged_again(tmp_path):
    out = tmp_path / "records.jsonl"
    data = rows(2)
    judge_rows(data, rule_judge, out, progress=False)
    data[1][1]["response"] = "The answer is 18."
    run = judge_rows(data, rule_judge, out, progress=False)
    assert (run.skipped, run.judged) == (1, 1)
    assert record_id(QUESTION, "a", "b") != record_id(QUESTION, "a", "c")


def test_output_that_is_not_ours_is_refused(tmp_path):
    out = write_jsonl(tmp_path / "records.jsonl", [{"question": "q"}])
    with pytest.raises(ValueError, match="line 1: no 'id' and 'line'"):
        judge_rows(rows(1), rule_judge, out, progress=False)


def test_resuming_with_another_judge_is_refused(tmp_path, capsys):
    """Each row names its judge; an --out another judge wrote is not resumed (its verdicts would be kept)."""
    out = tmp_path / "records.jsonl"
    judge_rows(rows(2), rule_judge, out, progress=False)
    before = out.read_text()
    assert {r["judge"] for r in read_jsonl(out)} == {"rule"}
    with StubServer(ok) as server:
        judge = OpenAIJudge(server.base_url, "m")
        with pytest.raises(ValueError, match=r"line 1: judged by 'rule', not by this judge .*use a new --out"):
            judge_rows(rows(2), judge, out, progress=False)
        assert out.read_text() == before and not server.requests
        responses = write_jsonl(tmp_path / "responses.jsonl", [row for _, row in rows(2)])
        assert main(["judge", "--in", str(responses), "--out", str(out), "--base-url", server.base_url, "--model",
                     "m"]) == 2  # fmt: skip
        assert "judged by 'rule'" in capsys.readouterr().err and out.read_text() == before
        run = judge_rows(rows(2), judge, out, progress=False, overwrite=True)  # starting afresh is fine
    assert run.judged == 2 and {r["judge"] for r in read_jsonl(out)} == {judge.name}


def test_server_going_down_keeps_what_was_judged(tmp_path):
    out = tmp_path / "records.jsonl"
    server = StubServer(ok).__enter__()
    judge = OpenAIJudge(server.base_url, "m", max_retries=1, backoff=0.01)
    judge_rows(rows(2), judge, out, progress=False)
    server.__exit__(None, None, None)
    with pytest.raises(JudgeUnavailable):
        judge_rows(rows(4), judge, out, concurrency=2, progress=False)
    assert sorted(r["line"] for r in read_jsonl(out)) == [1, 2]


def test_records_in_a_row_with_no_reply_stop_the_run(tmp_path):
    """A server that accepts connections but never answers in time: after 3 records in a row
    timed out the run stops (JudgeUnavailable) instead of timing out on every record; their
    error rows are kept, and the rerun retries them."""
    out = tmp_path / "records.jsonl"
    with StubServer(lambda n, b: (200, chat_reply(REPLY_RIGHT), 2.0)) as server:
        judge = OpenAIJudge(server.base_url, "m", timeout=0.2, max_retries=0)
        with pytest.raises(JudgeUnavailable, match=r"the last 3 records got no reply \(the last: no reply within 0.2"):
            judge_rows(rows(8), judge, out, progress=False, max_consecutive_failures=3)
    assert len(server.requests) == 3
    written = read_jsonl(out)
    assert [r["line"] for r in written] == [1, 2, 3] and all("no reply within" in r["error"] for r in written)


def test_a_reply_between_failures_starts_the_count_again(tmp_path):
    """Odd records time out, even ones are answered: never 2 in a row without a reply, so the run
    goes to the end with max_consecutive_failures=2, the timeouts as error rows."""

    def odd_ones_hang(number, body):
        status, data, _ = ok(number, body)
        return status, data, 2.0 if "wrong" in json.loads(data)["choices"][0]["message"]["content"] else 0.0

    out = tmp_path / "records.jsonl"
    with StubServer(odd_ones_hang) as server:
        judge = OpenAIJudge(server.base_url, "m", timeout=0.2, max_retries=0)
        run = judge_rows(rows(6), judge, out, progress=False, max_consecutive_failures=2)
    assert (run.judged, run.errors) == (3, 3) and len(server.requests) == 6


def test_cli_stops_after_consecutive_failures(tmp_path, capsys):
    responses = write_jsonl(tmp_path / "responses.jsonl", [row for _, row in rows(6)])
    out = tmp_path / "records.jsonl"
    with StubServer(lambda n, b: (200, chat_reply(REPLY_RIGHT), 2.0)) as server:
        status = main(["judge", "--in", str(responses), "--out", str(out), "--base-url", server.base_url, "--model",
                       "m", "--timeout", "0.2", "--max-retries", "0", "--concurrency", "1",
                       "--max-consecutive-failures", "2"])  # fmt: skip
    message = capsys.readouterr().err
    assert status == 1
    assert "cannot reach the judge" in message and "the last 2 records got no reply" in message
    assert "rerun to resume" in message and len(server.requests) == 2 and len(read_jsonl(out)) == 2


def test_judge_help_states_the_stop_and_exit_policy(capsys):
    with pytest.raises(SystemExit) as info:
        main(["judge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert info.value.code == 0
    policy = ["--max-consecutive-failures", "rerun to resume", "Ctrl-C ends the requests in flight"]
    policy += ["Exit status: 0 the run finished", "3 the run finished with --strict", "1 the run stopped"]
    for words in policy:
        assert words in text, words


def test_ctrl_c_ends_requests_and_retries_in_flight(tmp_path):
    """`nlft judge --concurrency 2` interrupted (SIGINT) while one request waits on a 30 s reply and
    another sleeps a 30 s backoff after an HTTP 500: it exits (130) within seconds, not after them,
    and the two records judged before stay in the output."""
    responses = write_jsonl(tmp_path / "responses.jsonl", [row for _, row in rows(4)])
    out = tmp_path / "records.jsonl"

    def slow_and_failing(number, body):
        content = body["messages"][1]["content"]
        if "(#2)" in content:
            return 200, chat_reply(REPLY_RIGHT), 30.0
        if "(#3)" in content:
            return 500, b"overloaded", 0.0
        return ok(number, body)

    with StubServer(slow_and_failing) as server:
        cmd = [sys.executable, "-m", "nlft_kernels", "judge", "--in", str(responses), "--out", str(out)]
        cmd += ["--base-url", server.base_url, "--model", "m", "--concurrency", "2", "--backoff", "30"]
        process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300  # a loaded machine starts python slowly
        while time.monotonic() < deadline and len(server.requests) < 4:
            time.sleep(0.05)
        time.sleep(0.3)  # the 500 answered: its call is in its backoff
        assert len(server.requests) == 4 and server.in_flight == 1, "#2 must be in flight and #3 in its backoff"
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        elapsed = time.monotonic() - started
    assert process.returncode == 130 and "interrupted" in err.decode()
    assert elapsed < 5, f"exit took {elapsed:.1f} s: it waited for the requests in flight"
    assert sorted(r["line"] for r in read_jsonl(out)) == [1, 2] and len(server.requests) == 4


def test_killed_mid_run_then_resumed(tmp_path):
    """`nlft judge` in a subprocess, killed (SIGKILL) after its second record; the rerun judges
    only the rest, and every record ends up in the output exactly once."""
    n = 8
    responses = write_jsonl(tmp_path / "responses.jsonl", [row for _, row in rows(n)])
    out = tmp_path / "records.jsonl"

    def slow(number, body):
        return ok(number, body)[:2] + (0.3,)

    with StubServer(slow) as server:
        cmd = [sys.executable, "-m", "nlft_kernels", "judge", "--in", str(responses), "--out", str(out)]
        cmd += ["--base-url", server.base_url, "--model", "m", "--concurrency", "1"]
        process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300  # a loaded machine starts python slowly
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
            time.sleep(0.05)
        process.kill()
        process.communicate()
        kept = read_jsonl(out)  # every line whole: flushed per record
        assert 2 <= len(kept) < n, "the run was not killed mid-way"
        first_run_requests = len(server.requests)
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed: {len(kept)} of {n} records were already judged" in done.stdout
    assert len(server.requests) - first_run_requests == n - len(kept)
    final = read_jsonl(out)
    assert sorted(r["line"] for r in final) == list(range(1, n + 1))
    assert final[: len(kept)] == kept
    assert f"{n - len(kept)}/{n - len(kept)}" in done.stderr and "record" in done.stderr  # the progress bar


# ------------------------------------------------------------------------- the CLI


def test_cli_judge_against_a_server_with_faults(tmp_path, capsys):
    """One record answers garbage, one HTTP 500 every time: both are error rows, counted on stderr;
    exit status 0, or 3 with --strict (the rerun retries both, which fail again)."""
    responses = write_jsonl(tmp_path / "responses.jsonl", [row for _, row in rows(4)])
    out = tmp_path / "records.jsonl"

    def faulty(number, body):
        content = body["messages"][1]["content"]
        if "(#1)" in content:
            return 200, b"not json at all", 0.0
        if "(#2)" in content:
            return 500, b"boom", 0.0
        return ok(number, body)

    with StubServer(faulty) as server:
        argv = ["judge", "--in", str(responses), "--out", str(out), "--base-url", server.base_url, "--model", "m",
                "--max-retries", "1", "--backoff", "0"]  # fmt: skip
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert "judged 2 responses: 1 correct, 1 wrong, 2 errors" in captured.out
        assert f"2 of 4 records have an error instead of a verdict (their 'error' field in {out})" in captured.err
        assert "rerun the same command to retry them" in captured.err
        assert main([*argv, "--strict"]) == 3
    errors = {r["line"]: r for r in read_jsonl(out) if "error" in r}
    assert "not a chat completion" in errors[2]["error"] and errors[2]["raw"] == "not json at all"
    assert "HTTP 500" in errors[3]["error"] and errors[3]["attempts"] == 2


def test_cli_server_down_is_a_clean_error(tmp_path, capsys):
    responses = write_jsonl(tmp_path / "responses.jsonl", [row for _, row in rows(2)])
    out = tmp_path / "records.jsonl"
    status = main(["judge", "--in", str(responses), "--out", str(out), "--base-url",
                   f"http://127.0.0.1:{free_port()}/v1", "--model", "m", "--max-retries", "0"])  # fmt: skip
    message = capsys.readouterr().err
    assert status == 1 and "cannot reach the judge" in message and "rerun to resume" in message
    assert out.read_text() == ""


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--base-url", "http://h/v1"], "--base-url needs --model"),
        (["--model", "m"], "it needs --base-url"),
        (["--base-url", "http://h/v1", "--model", "m", "--local-model", "x"], "name two judges"),
        (["--base-url", "http://h/v1", "--model", "m", "--judge", "a:b"], "third judge"),
        (["--base-url", "ftp://h", "--model", "m"], "http:// or https://"),
    ],
)
def test_cli_judge_flag_errors(tmp_path, capsys, extra, message):
    responses = write_jsonl(tmp_path / "responses.jsonl", [row for _, row in rows(1)])
    assert main(["judge", "--in", str(responses), "--out", str(tmp_path / "o.jsonl"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_never_writes_over_its_input(tmp_path, capsys):
    responses = write_jsonl(tmp_path / "responses.jsonl", [row for _, row in rows(2)])
    before = responses.read_bytes()
    assert main(["judge", "--in", str(responses), "--out", str(tmp_path / "." / "responses.jsonl")]) == 2
    assert "inputs are never rewritten" in capsys.readouterr().err
    assert responses.read_bytes() == before


def test_cli_api_key_from_the_environment(tmp_path, monkeypatch):
    responses = write_jsonl(tmp_path / "responses.jsonl", [row for _, row in rows(1)])
    monkeypatch.delenv("NLFT_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("MY_KEY", "sk-mine")
    with StubServer(ok) as server:
        base = ["judge", "--in", str(responses), "--base-url", server.base_url, "--model", "m"]
        main([*base, "--out", str(tmp_path / "a.jsonl")])
        main([*base, "--out", str(tmp_path / "b.jsonl"), "--api-key-env", "MY_KEY"])
    assert [r["headers"]["Authorization"] for r in server.requests] == ["Bearer sk-openai", "Bearer sk-mine"]


# ----------------------------------------------------------------------- a local model


SEED = 0
JUDGE_REPLY = "It adds 3 instead of subtracting.\nVerdict: wrong"


def _judge_prompt_ids(tokenizer, question: str, response: str, reference: str):
    """The token ids a judge model is given: judge_messages through the chat template."""
    text = tokenizer.apply_chat_template(
        judge_messages(question, response, reference), tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


def _model_that_replies(tokenizer, prompt_ids, reply: str):
    """The tiny random Llama (seed SEED) with only its output layer fitted, so that greedy decoding
    after ``prompt_ids`` writes ``reply`` then EOS: a real model and generate, with a known reply."""
    import torch

    from tests._tiny import tiny_model

    model = tiny_model(len(tokenizer), seed=SEED)
    target = torch.tensor(tokenizer(reply, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
    ids = torch.cat([prompt_ids[0], target[:-1]])[None]
    with torch.no_grad():  # the states that predict each reply token, as generate will see them
        hidden = model.model(ids).last_hidden_state[0, prompt_ids.shape[1] - 1 :]
    head = model.lm_head.weight
    optimizer = torch.optim.Adam([head], lr=0.1)
    for _ in range(2000):
        logits = hidden @ head.T
        loss = torch.nn.functional.cross_entropy(logits, target)
        if loss.item() < 0.05 and logits.argmax(-1).equal(target):  # a margin, for generate's cached states
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (hidden @ head.T).argmax(-1).equal(target), f"the head did not fit (seed {SEED})"
    return model.eval()


def test_local_model_judge_reads_the_verdict_its_model_generates(tmp_path):
    """The judge gives the model the judge prompt (question, reference, response in the chat
    template), decodes what it generates and parses it: a wrong verdict with its judgment."""
    from tests._tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    line, row = 1, {"question": "What is 16 - 3 - 4?", "response": "16 + 3 = 19. The answer is 19.", "answer": "#### 9"}
    prompt = _judge_prompt_ids(tokenizer, row["question"], row["response"], row["answer"])
    assert prompt.shape[1] + 40 <= 512, "prompt and reply within the tiny model's positions"
    judge = LocalModelJudge(_model_that_replies(tokenizer, prompt, JUDGE_REPLY), tokenizer, max_new_tokens=40)
    judge.name = "tiny"
    result = judge(row["question"], row["response"], row["answer"])
    assert (result.correct, result.judgment, result.raw) == (False, "It adds 3 instead of subtracting.", JUDGE_REPLY)
    out = tmp_path / "records.jsonl"
    run = judge_rows([(line, row)], judge, out, progress=False)
    (written,) = read_jsonl(out)
    assert (run.judged, run.wrong) == (1, 1)
    assert (written["judge"], written["correct"], written["judgment"]) == (
        "tiny",
        False,
        "It adds 3 instead of subtracting.",
    )


def test_local_model_judge_records_its_unreadable_replies(tmp_path):
    """The tiny random model cannot judge: each record is an error row whose raw reply is the
    model's greedy continuation of that record's judge prompt, not a loss."""
    import torch

    from tests._tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer), seed=SEED).eval()
    judge = LocalModelJudge(model, tokenizer, max_new_tokens=6, name="tiny")
    out = tmp_path / "records.jsonl"
    run = judge_rows(rows(2), judge, out, progress=False)
    written = {r["line"]: r for r in read_jsonl(out)}
    assert (run.errors, run.judged) == (2, 0), f"seed {SEED}: {written}"
    for line, row in rows(2):
        prompt = _judge_prompt_ids(tokenizer, row["question"], row["response"], row["answer"])
        with torch.no_grad():
            generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(generated[0, prompt.shape[1] :], skip_special_tokens=True)
        assert written[line]["judge"] == "tiny" and written[line]["raw"] == reply
        assert "no verdict" in written[line]["error"] or "empty" in written[line]["error"]


def test_local_model_needs_a_chat_template():
    from tests._tiny import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer(chat_template=False)
    with pytest.raises(ValueError, match="no chat template"):
        LocalModelJudge(tiny_model(len(tokenizer)), tokenizer)
