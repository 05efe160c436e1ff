"""The LLM judges (nlft_kernels.recipes.llm_judge): the server judge over the openai client against a
stub server in a thread (the request, the key, retries and their waits, Retry-After, timeouts in all,
HTTP errors, garbage, redirects, a server that is down, the stop event, credentials redacted or
refused unechoed) and the local-model judge on a tiny model. The real llama.cpp server:
tests/test_llm_server.py."""

from __future__ import annotations

import math
import threading
import time

import pytest

from nlft_kernels.recipes.errors import BadInput
from nlft_kernels.recipes.judge_prompt import judge_messages
from nlft_kernels.recipes.judging import judge_rows
from nlft_kernels.recipes.judgment import SCORE_CORRECT, Judge, JudgeError, JudgeStopped, JudgeUnavailable, Judgment
from nlft_kernels.recipes.llm_judge import LocalModelJudge, OpenAIJudge, api_key_from_env, redact
from nlft_kernels.recipes.rule_judge import rule_judge
from tests._judge_server import (
    QUESTION,
    REFERENCE,
    REPLY_RIGHT,
    StubServer,
    chat_reply,
    free_port,
    ok,
    read_jsonl,
    rows,
)

KEY = "sk-test-0123456789abcdef"


def test_every_judge_is_a_judge():
    assert isinstance(rule_judge, Judge) and isinstance(OpenAIJudge("http://x/v1", "m"), Judge)
    assert rule_judge(QUESTION, "The answer is 18.", REFERENCE) == Judgment(True, None, SCORE_CORRECT)
    with pytest.raises(JudgeError, match="no final answer"):
        rule_judge(QUESTION, "The answer is 18.", "no number")


# ------------------------------------------------------------------------------- the request


def test_reply_and_api_key():
    with StubServer(ok) as server:
        judge = OpenAIJudge(server.base_url, "judge-model", api_key=KEY, max_tokens=7)
        result = judge(f"{QUESTION} (#1)", "The answer is 21.", REFERENCE)
    assert not result.correct and result.judgment.startswith("The step 16 - 3 = 12 is wrong")
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {KEY}"
    body = request["body"]
    assert (body["model"], body["max_tokens"], body["temperature"], body["seed"]) == ("judge-model", 7, 0.0, 0)
    assert "The answer is 21." in body["messages"][1]["content"] and "response_format" not in body


def test_without_a_key_no_authorization_is_sent(monkeypatch):
    for name in ("NLFT_JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with StubServer(ok) as server:
        OpenAIJudge(server.base_url, "m", api_key=api_key_from_env())(f"{QUESTION} (#0)", "r", REFERENCE)
    assert "authorization" not in {k.lower() for k in server.requests[0]["headers"]}


def test_base_url_from_the_environment(monkeypatch):
    with StubServer(ok) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url + "/")
        judge = OpenAIJudge(None, "m")
        assert judge.base_url == server.base_url and judge(f"{QUESTION} (#0)", "r", REFERENCE).correct
    assert len(server.requests) == 1


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("NLFT_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("MY_KEY", "sk-mine")
    assert api_key_from_env() == "sk-openai" and api_key_from_env("MY_KEY") == "sk-mine"
    monkeypatch.setenv("NLFT_JUDGE_API_KEY", "sk-nlft")
    assert api_key_from_env() == "sk-nlft"
    monkeypatch.delenv("MY_KEY")
    with pytest.warns(UserWarning, match=r"\$MY_KEY .* is not set or empty: no API key is sent"):
        assert api_key_from_env("MY_KEY") is None  # never another variable's key


@pytest.mark.parametrize("fmt", ["json_object", "json_schema"])
def test_response_formats(fmt):
    with StubServer(lambda n, b: (200, chat_reply('{"judgment": "", "correct": true}'), 0.0)) as server:
        assert OpenAIJudge(server.base_url, "m", response_format=fmt)("q", "r", "a").correct
    body = server.requests[0]["body"]
    assert body["response_format"]["type"] == fmt and "JSON" in body["messages"][0]["content"]
    schema = body["response_format"]["schema" if fmt == "json_object" else "json_schema"]
    assert "correct" in str(schema)


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.5])
def test_temperature_must_be_finite_and_not_negative(value):
    with pytest.raises(BadInput, match="temperature must be a finite number >= 0"):
        OpenAIJudge("http://h/v1", "m", temperature=value)


# ------------------------------------------------------------------------------ the retries


def test_http_500_is_retried_with_backoff():
    """Two 500s, then an answer: three requests, 1.5 s then 3 s apart (--backoff 1.5, doubled, up to
    10% more), not the openai client's own waits (0.5 s then 1 s at most)."""
    replies = iter([(500, b"overloaded", 0.0), (500, b"overloaded", 0.0), (200, chat_reply(REPLY_RIGHT), 0.0)])
    with StubServer(lambda n, b: next(replies)) as server:
        assert OpenAIJudge(server.base_url, "m", max_retries=3, backoff=1.5)("q", "r", "a").correct
    at = [r["at"] for r in server.requests]
    assert len(at) == 3
    gaps = [at[1] - at[0], at[2] - at[1]]
    assert 1.5 <= gaps[0] < 1.5 * 1.1 + 1.0 and 3.0 <= gaps[1] < 3.0 * 1.1 + 1.0, gaps


def test_429_waits_for_retry_after():
    """A 429 with Retry-After: 1 waits the second it asks for, not the 0.01 s backoff."""
    replies = iter([(429, b"slow down", 0.0, {"Retry-After": "1"}), (200, chat_reply(REPLY_RIGHT), 0.0)])
    with StubServer(lambda n, b: next(replies)) as server:
        assert OpenAIJudge(server.base_url, "m", max_retries=1, backoff=0.01)("q", "r", "a").correct
    at = [r["at"] for r in server.requests]
    assert len(at) == 2 and 1.0 <= at[1] - at[0] < 2.5, at


def test_retry_after_an_hour_is_not_waited_for():
    """A server asking for an hour: the record gets an error at once (retried by the next run)."""
    with StubServer(lambda n, b: (429, b"come back later", 0.0, {"Retry-After": "3600"})) as server:
        started = time.monotonic()
        with pytest.raises(JudgeError, match="HTTP 429 from the judge: come back later"):
            OpenAIJudge(server.base_url, "m", max_retries=2, backoff=0.01)("q", "r", "a")
        assert time.monotonic() - started < 5
    assert len(server.requests) == 1


def test_http_500_every_time_is_an_error_on_the_record():
    with StubServer(lambda n, b: (500, b"internal error", 0.0)) as server:
        judge = OpenAIJudge(server.base_url, "m", max_retries=2, backoff=0.0)
        with pytest.raises(JudgeError, match=r"HTTP 500 from the judge: internal error \(after 3 attempts\)") as info:
            judge("q", "r", "a")
    assert len(server.requests) == 3 and info.value.raw == "internal error" and not info.value.transport


def test_slow_server_times_out():
    with StubServer(lambda n, b: (200, chat_reply(REPLY_RIGHT), 1.0)) as server:
        judge = OpenAIJudge(server.base_url, "m", timeout=0.2, max_retries=1, backoff=0.0)
        started = time.monotonic()
        with pytest.raises(JudgeError, match=r"no reply within 0.2 s \(after 2 attempts\)") as info:
            judge("q", "r", "a")
        assert time.monotonic() - started < 1.5  # two timeouts, not two full replies
    assert len(server.requests) == 2 and info.value.transport


def test_a_reply_that_drips_times_out_in_all():
    """--timeout bounds each attempt in all: a body sent a byte every 20 ms (about 3 s in all, each
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


def test_server_down():
    judge = OpenAIJudge(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=2, backoff=0.01)
    with pytest.raises(JudgeUnavailable, match=r"cannot reach the judge .*connection failed.*after 3 attempts"):
        judge("q", "r", "a")


@pytest.mark.parametrize("code", [302, 307])
def test_redirects_are_not_followed_with_the_api_key(code):
    """A server that redirects (302: same host; 307: another host, which would get the body and,
    followed naively, the key): the judge stops; the other host sees nothing."""
    with StubServer(ok) as elsewhere:
        location = "/elsewhere" if code == 302 else elsewhere.base_url + "/chat/completions"
        with StubServer(lambda n, b: (code, b"", 0.0, {"Location": location})) as server:
            judge = OpenAIJudge(server.base_url, "m", api_key=KEY)
            with pytest.raises(JudgeUnavailable, match=rf"redirect \(HTTP {code}\) to .*{location}.*not followed"):
                judge("q", "r", "a")
    assert [r["headers"]["authorization"] for r in server.requests] == [f"Bearer {KEY}"]
    assert not elsewhere.requests


def test_the_environment_proxy_is_used_unless_no_proxy_exempts_the_host(monkeypatch):
    """$HTTP_PROXY (a stub that answers as the judge) carries the request for an unresolvable host;
    with the host in $NO_PROXY the judge connects directly and finds no server."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with StubServer(ok) as proxy:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server.server_address[1]}")
        monkeypatch.setenv("no_proxy", "")
        assert OpenAIJudge("http://judge.invalid/v1", "m")(f"{QUESTION} (#0)", "r", REFERENCE).correct
        monkeypatch.setenv("no_proxy", "judge.invalid")
        with pytest.raises(JudgeUnavailable, match="cannot reach the judge at http://judge.invalid"):
            OpenAIJudge("http://judge.invalid/v1", "m", max_retries=0)("q", "r", "a")
    assert [r["path"] for r in proxy.requests] == ["http://judge.invalid/v1/chat/completions"]


# ------------------------------------------------------------------------------ the stop event


def test_stop_ends_a_request_in_flight_and_a_backoff():
    """One call waits on a 30 s reply, another sleeps a 30 s backoff after an HTTP 500: setting
    ``stop`` ends both within a fraction of a second, and the waiting request's connection is closed."""

    def handle(number, body):
        return (200, chat_reply(REPLY_RIGHT), 30.0) if "slow" in str(body) else (500, b"overloaded", 0.0)

    with StubServer(handle) as server:
        judge = OpenAIJudge(server.base_url, "m", backoff=30.0)
        outcomes = []

        def call(question):
            try:
                judge(question, "r", "a")
            except Exception as err:
                outcomes.append(type(err))

        threads = [threading.Thread(target=call, args=(q,)) for q in ("slow", "failing")]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(server.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert len(server.requests) == 2 and server.in_flight == 1, "one in flight, one in its backoff"
        started = time.monotonic()
        judge.stop.set()
        for thread in threads:
            thread.join(timeout=5)
        elapsed = time.monotonic() - started
        time.sleep(0.3)
        closed = server.closed
    assert outcomes == [JudgeStopped, JudgeStopped] and elapsed < 2.0, (outcomes, elapsed)
    assert len(server.requests) == 2 and closed == 1  # no retry sent; the slow request hung up


# ------------------------------------------------------------------------------ credentials


def test_base_url_with_a_password_is_refused_unechoed():
    for url in ("http://alice:hunter2secret@judge.example/v1", "https://sk-in-the-user@judge.example/v1"):
        with pytest.raises(BadInput, match="user name or password") as info:
            OpenAIJudge(url, "m")
        assert "hunter2secret" not in str(info.value) and "sk-in-the-user" not in str(info.value)
    with pytest.raises(BadInput, match="query string") as info:
        OpenAIJudge("http://judge.example/v1?api_key=sk-query-secret", "m")
    assert "sk-query-secret" not in str(info.value)
    with pytest.raises(BadInput, match="http:// or https://"):
        OpenAIJudge("localhost:8000", "m")


def test_redact():
    text = (
        f'key {KEY}; Authorization: Bearer abc.def-ghi; https://h/v1?api_key=q-secret&x=1 {{"api_key": "j-secret"}} '
        "http://bob:pw-secret@h/ sk-otherkey0123456789 token=t-secret"
    )
    clean = redact(text, [KEY])
    for secret in (KEY, "abc.def-ghi", "q-secret", "j-secret", "bob:pw-secret", "sk-otherkey0123456789", "t-secret"):
        assert secret not in clean, secret
    assert "x=1" in clean and clean.count("[redacted]") == 7


def test_error_bodies_are_stored_with_credentials_redacted(tmp_path):
    """A server that echoes the request's key in its error bodies (HTTP 500 and a 200 that is no
    chat completion) and in a 401: neither the messages nor the rows written keep the key."""

    def echo(number, body):
        said = f'{{"error": "bad request with Authorization: Bearer {KEY}", "url": "/v1?api_key={KEY}"}}'.encode()
        question = body["messages"][1]["content"]
        return (500, said, 0.0) if "(#0)" in question else (200, said, 0.0)

    out = tmp_path / "records.jsonl"
    with StubServer(echo) as server:
        judge_rows(rows(2), OpenAIJudge(server.base_url, "m", api_key=KEY, max_retries=0), out, progress=False)
    written = out.read_text()
    assert KEY not in written and written.count("[redacted]") >= 4
    assert {r["line"]: "error" in r for r in read_jsonl(out)} == {1: True, 2: True}
    with StubServer(lambda n, b: (401, f"invalid key {KEY}".encode(), 0.0)) as server:
        with pytest.raises(JudgeUnavailable) as info:
            OpenAIJudge(server.base_url, "m", api_key=KEY)("q", "r", "a")
    assert KEY not in str(info.value) and "invalid key [redacted]" in str(info.value)


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
