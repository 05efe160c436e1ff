"""Judges behind one interface: the rule-based GSM8K judge, an LLM behind any OpenAI-compatible
chat-completions server (vLLM, SGLang, llama.cpp's server, OpenAI), and a local transformers model.

A judge is any callable ``judge(question, response, reference_solution) -> Judgment`` (the
:class:`Judge` protocol). NLFT needs two things from it: is the response correct, and, when it is
not, a judgment in natural language of what is wrong (the judge view's prompt quotes it). The LLM
judges ask for both with the paper's judge prompt (:data:`JUDGE_SYSTEM_PROMPT`) and read the reply
with :func:`parse_verdict`, which tolerates formatting noise.

Failures are typed so that a run can keep every record: :class:`JudgeError` (this record has no
verdict: a malformed reply, a timeout, an HTTP error after the retries; the runner writes it as an
error on the record; ``transport`` when no reply came at all), :class:`JudgeUnavailable` (no record
can be judged: the server cannot be reached or refuses the key; the runner stops) and
:class:`JudgeStopped` (the run is ending: Ctrl-C or another record's fatal error set the judge's
``stop`` event; nothing is written for the record).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from typing import Protocol, runtime_checkable

from nlft_kernels.recipes.rule_judge import SCORE_CORRECT, SCORE_WRONG_ANSWER, Judgment, judge_response

# The environment variables the API key is read from, first set wins (never a command-line flag:
# those show in `ps` and shell history).
API_KEY_ENV = ("NLFT_JUDGE_API_KEY", "OPENAI_API_KEY")
# The authors' scores: a response scored >= 7 of 10 is correct (see training.data.CORRECT_SCORE).
CORRECT_SCORE_OF_10 = 7


@runtime_checkable
class Judge(Protocol):
    """What every judge is: ``(question, response, reference_solution) -> Judgment``.

    Raises :class:`JudgeError` when this record gets no verdict, :class:`JudgeUnavailable` when
    no record can get one. ``name`` (optional) is written into each judged record.
    """

    def __call__(self, question: str, response: str, reference_solution: str) -> Judgment: ...


class JudgeError(Exception):
    """One record got no verdict; ``raw`` is the judge's reply when there was one; ``transport``
    when its last attempt got no reply at all (a timeout, a reset or dropped connection)."""

    def __init__(self, message: str, raw: str | None = None, attempts: int = 1, transport: bool = False) -> None:
        super().__init__(message)
        self.raw, self.attempts, self.transport = raw, attempts, transport


class JudgeUnavailable(Exception):
    """No record can be judged (server unreachable, key refused, no such endpoint or model)."""


class JudgeStopped(Exception):
    """The run is ending (the judge's ``stop`` event is set): this record was left unjudged."""


def rule_judge(question: str, response: str, reference_solution: str) -> Judgment:
    """The rule-based GSM8K judge (:func:`nlft_kernels.recipes.rule_judge.judge_response`), behind :class:`Judge`."""
    try:
        return judge_response(question, response, reference_solution)
    except ValueError as err:  # a reference without a final answer: this record only
        raise JudgeError(str(err)) from err


rule_judge.name = "rule"


# ------------------------------------------------------------------------------- the prompt

# Written after the authors' judge prompt (utils/helper.py `sys2` in the NLFT repository: a math
# expert sees the problem, the student's response and the correct answer, checks the process and
# the answer, and either declares the response correct or analyses why it is wrong), plus a
# verdict line so that a reply can be read without guessing.
JUDGE_SYSTEM_PROMPT = (
    "You are a math expert. You are given a math problem, its reference solution and a student's response.\n"
    "Check whether the student's response is correct: both the solution process and the final answer.\n"
    "If the response is correct, write: The response is correct.\n"
    "If the response is wrong, analyse why it is wrong: name the first wrong step and what is wrong with it, "
    "and say what the correct reasoning and the correct final answer are.\n"
    "End with one line that is exactly 'Verdict: correct' or 'Verdict: wrong'."
)
JUDGE_JSON_INSTRUCTION = (
    "Reply with a JSON object only: "
    '{"judgment": "<your analysis of the errors, or The response is correct.>", "correct": true or false}'
)
JUDGE_USER_TEMPLATE = (
    "### Question:\n{question}\n\n### Reference solution:\n{reference}\n\n### Student's response:\n{response}\n"
)
# For servers that constrain decoding to a schema (llama.cpp, vLLM, SGLang, OpenAI).
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"judgment": {"type": "string"}, "correct": {"type": "boolean"}},
    "required": ["judgment", "correct"],
}
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def judge_messages(question: str, response: str, reference_solution: str, json_reply: bool = False) -> list[dict]:
    """The chat messages that ask a judge model for a verdict and a judgment."""
    system = JUDGE_SYSTEM_PROMPT + ("\n" + JUDGE_JSON_INSTRUCTION if json_reply else "")
    user = JUDGE_USER_TEMPLATE.format(
        question=question.strip(), reference=reference_solution.strip(), response=response
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# -------------------------------------------------------------------------- reading a reply

# No bare "yes"/"no": "Verdict: no errors" would read as wrong.
_NEGATIVE = r"incorrect|not\s+correct|wrong|false|fail(?:ed)?|invalid"
_POSITIVE = r"correct|right|true|pass(?:ed)?|valid"
_VERDICT_LINE = re.compile(
    rf"^[\s#*_>`\-]*(?:final\s+)?(?:verdict|rating|decision|result|conclusion)[\s*_`]*[:=\-]?[\s*_`\[\"']*"
    r"(?:the\s+(?:student'?s\s+)?(?:response|answer|solution)\s+is\s+)?"
    rf"(?P<word>{_NEGATIVE}|{_POSITIVE})\b[^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
_BRACKETED = re.compile(
    rf"(?:\b(?:verdict|rating)\s*:\s*)?\[\[\s*(?P<word>{_NEGATIVE}|{_POSITIVE})\s*\]\]\.?", re.IGNORECASE
)
_SENTINEL_CORRECT = re.compile(r"the\s+(?:student'?s\s+)?response\s+is\s+(?:fully\s+)?correct\b", re.IGNORECASE)
# The sentence alone is a verdict only in a reply with no word of blame: "The response is correct
# in its setup, but 9*2=16 is wrong" is not a correct verdict.
_BLAME = re.compile(
    r"\b(?:incorrect\w*|wrong\w*|errors?|erroneous|mistakes?|mistaken|not|no|\w+n't|false|fail\w*|invalid)\b",
    re.IGNORECASE,
)
_SCORE_LINE = re.compile(
    r"^[\s#*_>`\-]*score[\s*_`]*[:=]?[\s*_`]*(?P<score>\d+(?:\.\d+)?)\s*(?:/\s*(?P<of>\d+))?[^\n]*$",
    re.IGNORECASE | re.MULTILINE,
)
_LABEL = re.compile(r"^[\s#*_`]*(?:judg(?:e)?ment|analysis|explanation|reasoning)[\s*_`]*:[\s*_`]*", re.IGNORECASE)
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)


def _is_negative(word: str) -> bool:
    return re.fullmatch(_NEGATIVE, word.strip(), re.IGNORECASE) is not None


def _from_json(reply: str) -> tuple[bool, str | None, float | None] | None:
    """(correct, judgment, score) of a JSON reply (fenced or not), or None if it is not one."""
    text = _FENCE.sub("", reply.strip())
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        value = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    value = {str(k).lower(): v for k, v in value.items()}
    judgment = next(
        (value[k] for k in ("judgment", "judgement", "analysis", "explanation", "reason") if k in value), None
    )
    judgment = judgment if isinstance(judgment, str) else None
    score = value.get("score")
    score = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None
    for key in ("correct", "is_correct", "verdict", "rating", "result"):
        verdict = value.get(key)
        if isinstance(verdict, bool):
            return verdict, judgment, score
        if isinstance(verdict, str) and re.fullmatch(rf"\s*({_NEGATIVE}|{_POSITIVE})\W*", verdict, re.IGNORECASE):
            return not _is_negative(verdict.strip(" .!")), judgment, score
    if score is not None:
        return score >= CORRECT_SCORE_OF_10, judgment, score
    return None


def parse_verdict(reply: str) -> Judgment:
    """The :class:`Judgment` in a judge model's reply; :class:`JudgeError` (with the reply) if none.

    Read, first that matches: a JSON object (``correct``/``verdict``/``score``, ``judgment``), in
    a code fence or not; the last ``Verdict: correct|wrong`` line (also ``**Verdict:** Incorrect``,
    ``Final verdict - wrong``, ``Rating: [[correct]]``); ``[[correct]]``; the authors' sentence
    "The response is correct" (only in a reply with no word of blame: incorrect, wrong, error,
    mistake, not...); a ``Score: n/10`` line (correct when >= 7, the authors' rule).
    The judgment is the reply without its verdict and score lines. A wrong verdict with no
    judgment is an error: NLFT's judge view needs the judgment.
    """
    if not isinstance(reply, str) or not reply.strip():
        raise JudgeError("the judge's reply is empty", raw=reply if isinstance(reply, str) else None)
    parsed = _from_json(reply)
    if parsed is not None:
        correct, judgment, score = parsed
    else:
        verdicts = list(_VERDICT_LINE.finditer(reply)) or list(_BRACKETED.finditer(reply))
        scores = list(_SCORE_LINE.finditer(reply))
        score = None
        if scores:
            value, of = float(scores[-1]["score"]), float(scores[-1]["of"] or 10)
            score = 10 * value / of if of > 0 else None
        if verdicts:
            correct = not _is_negative(verdicts[-1]["word"])
        elif _SENTINEL_CORRECT.search(reply) and not _BLAME.search(reply):
            correct = True
        elif score is not None:
            correct = score >= CORRECT_SCORE_OF_10
        else:
            raise JudgeError("no verdict in the judge's reply (expected a line 'Verdict: correct|wrong')", raw=reply)
        text = _VERDICT_LINE.sub("", reply)
        text = _SCORE_LINE.sub("", _BRACKETED.sub("", text))
        judgment = "\n".join(_LABEL.sub("", line) for line in text.strip().splitlines()).strip() or None
    if correct:
        return Judgment(True, None, SCORE_CORRECT, raw=reply)
    if not judgment or not judgment.strip():
        raise JudgeError("the judge says wrong but gives no judgment of the errors", raw=reply)
    return Judgment(False, judgment.strip(), SCORE_WRONG_ANSWER if score is None else score / 10, raw=reply)


# ------------------------------------------------------------ an OpenAI-compatible server


def api_key_from_env(names: tuple[str, ...] = API_KEY_ENV) -> str | None:
    """The first non-empty of the environment variables ``names``."""
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def chat_completions_url(base_url: str) -> str:
    """``{base_url}/chat/completions`` (``base_url`` as for the OpenAI client, e.g. ``http://host:8000/v1``);
    a URL that already ends in ``/chat/completions`` is kept."""
    url = base_url.rstrip("/")
    if not re.match(r"https?://", url):
        raise ValueError(f"the judge's base URL must start with http:// or https://, got {base_url!r}")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class _Retryable(Exception):
    """A failure worth another attempt; ``fatal`` when, after the last one, no record can succeed;
    ``transport`` when no reply came (not an HTTP error status)."""

    def __init__(
        self, message: str, fatal: bool = False, retry_after: float | None = None, transport: bool = False
    ) -> None:
        super().__init__(message)
        self.fatal, self.retry_after, self.transport = fatal, retry_after, transport or fatal


class _Redirected(Exception):
    """The judge's server answered with a redirect, which is not followed."""

    def __init__(self, code: int, location: str) -> None:
        super().__init__(f"redirect (HTTP {code}) to {location}")
        self.code, self.location = code, location


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects with every header of the request, the API key included: refuse."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise _Redirected(code, newurl)


class _Deadline:
    """One request's watchdog: when ``timeout`` seconds have passed since it started, or ``stop``
    is set, it shuts the request's socket down, which ends a read blocked anywhere (the status
    line, the headers, a body that drips in byte by byte). So ``timeout`` bounds the whole
    request, not each read as a socket timeout does; ``fired`` says why it ended one."""

    POLL = 0.05  # seconds between looks at ``stop``: how soon Ctrl-C ends a request in flight

    def __init__(self, timeout: float, stop: threading.Event) -> None:
        self.timeout, self.deadline, self.stop = timeout, time.monotonic() + timeout, stop
        self.fired: str | None = None
        self.sock = None
        self.lock, self.done = threading.Lock(), threading.Event()
        threading.Thread(target=self._watch, name="nlft-judge-deadline", daemon=True).start()

    def left(self) -> float:
        return max(self.deadline - time.monotonic(), 1e-3)

    def attach(self, sock) -> None:
        with self.lock:
            self.sock = sock
            if self.fired:
                self._shut()

    def close(self) -> None:
        self.done.set()

    def _watch(self) -> None:
        while not self.done.wait(min(self.POLL, max(self.deadline - time.monotonic(), 0.0))):
            reason = "stopped" if self.stop.is_set() else "timeout" if time.monotonic() >= self.deadline else None
            if reason:
                with self.lock:
                    if not self.done.is_set():
                        self.fired = reason
                        self._shut()
                return

    def _shut(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed already
                pass


class _DeadlineHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, deadline: _Deadline, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        self.timeout = self.deadline.left()  # the connect itself is bounded by what is left
        super().connect()
        self.deadline.attach(self.sock)


class _DeadlineHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, deadline: _Deadline, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        self.timeout = self.deadline.left()
        super().connect()  # TCP, then TLS: self.sock is the TLS socket
        self.deadline.attach(self.sock)


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(partial(_DeadlineHTTPConnection, deadline=self.deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(partial(_DeadlineHTTPSConnection, deadline=self.deadline), req, context=self._context)


class OpenAIJudge:
    """An LLM judge behind an OpenAI-compatible ``/chat/completions`` endpoint, with the standard
    library only (urllib): each call sends :func:`judge_messages` and parses the reply.

    Robustness: ``timeout`` seconds per request, in all (connect, headers and body: a server
    that drips its reply still times out); up to ``max_retries`` more attempts after a
    timeout, a dropped connection, HTTP 429 or 5xx, waiting ``backoff * 2**attempt`` seconds
    (with 10% jitter; a 429's Retry-After when given; either capped at 30 s). After the last attempt a
    connection that is refused (or a host name that does not resolve) raises
    :class:`JudgeUnavailable`; the rest raise :class:`JudgeError` (``transport`` when no reply
    came), as do a body that is not a chat completion and a reply with no verdict
    (not retried: at temperature 0 it would come back the same). HTTP 401/403/404 and
    a redirect (never followed: it would carry the API key elsewhere) raise
    :class:`JudgeUnavailable` at once. Thread-safe: the runner calls it from several threads.
    ``stop`` (a ``threading.Event``; the runner sets it when a run ends early, e.g. on Ctrl-C)
    ends the backoff waits and the requests in flight within ~0.05 s, with :class:`JudgeStopped`.

    ``response_format``: ``text`` (default, any server), ``json_object`` (with the verdict schema,
    as llama.cpp's server and vLLM constrain it) or ``json_schema`` (OpenAI's structured outputs).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_tokens: int = 512,
        temperature: float = 0.0,
        response_format: str = "text",
        seed: int | None = 0,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if timeout <= 0 or max_retries < 0 or backoff < 0 or max_tokens < 1:
            raise ValueError("timeout and max_tokens must be positive, max_retries and backoff >= 0")
        if response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be one of {RESPONSE_FORMATS}, got {response_format!r}")
        self.url = chat_completions_url(base_url)
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_retries, self.backoff, self.max_tokens = max_retries, backoff, max_tokens
        self.temperature, self.response_format, self.seed, self.sleep = temperature, response_format, seed, sleep
        self.name = f"{model} at {base_url}"
        self.stop = threading.Event()

    def __call__(self, question: str, response: str, reference_solution: str) -> Judgment:
        messages = judge_messages(question, response, reference_solution, json_reply=self.response_format != "text")
        reply, attempts = self.complete(messages)
        try:
            return parse_verdict(reply)
        except JudgeError as err:
            err.attempts = attempts
            raise

    def request_body(self, messages: list[dict]) -> dict:
        """The JSON body of one chat-completions request."""
        body: dict = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        if self.response_format == "json_object":
            body["response_format"] = {"type": "json_object", "schema": VERDICT_SCHEMA}
        elif self.response_format == "json_schema":
            schema = {"name": "verdict", "schema": VERDICT_SCHEMA | {"additionalProperties": False}, "strict": True}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        return body

    def complete(self, messages: list[dict]) -> tuple[str, int]:
        """(the reply's text, attempts made) for ``messages``, with the retries described above."""
        data = json.dumps(self.request_body(messages)).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            if self.stop.is_set():
                raise JudgeStopped("the run is stopping")
            try:
                return self._post(data, headers), attempt + 1
            except _Retryable as err:
                if attempt == self.max_retries:
                    message = f"{err} (after {attempt + 1} attempt{'s' * (attempt > 0)})"
                    if err.fatal:
                        raise JudgeUnavailable(f"cannot reach the judge at {self.url}: {message}") from None
                    raise JudgeError(message, attempts=attempt + 1, transport=err.transport) from None
                delay = min(30.0, self.backoff * 2**attempt)
                if err.retry_after is not None:  # the server's wait, within the same cap
                    delay = min(30.0, err.retry_after)
                else:
                    delay *= 1 + 0.1 * random.random()
                if self.sleep is not None:
                    self.sleep(delay)
                elif self.stop.wait(delay):  # the backoff ends as soon as the run stops
                    raise JudgeStopped("the run is stopping") from None
        raise AssertionError("unreachable")

    def _post(self, data: bytes, headers: dict[str, str]) -> str:
        """One attempt: the reply's text content, or the failure, typed for :meth:`complete`."""
        deadline = _Deadline(self.timeout, self.stop)
        opener = urllib.request.build_opener(
            _NoRedirects, _DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline)
        )
        try:
            return self._exchange(opener, data, headers)
        except Exception:
            # A socket the deadline shut down fails in whatever way the read it cut short does:
            # say why it ended instead.
            if deadline.fired == "stopped":
                raise JudgeStopped("the run is stopping") from None
            if deadline.fired == "timeout":
                raise _Retryable(f"no reply within {self.timeout:g} s", transport=True) from None
            raise
        finally:
            deadline.close()

    def _exchange(self, opener, data: bytes, headers: dict[str, str]) -> str:
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with opener.open(request, timeout=self.timeout) as reply:
                body = reply.read()
        except _Redirected as err:
            raise JudgeUnavailable(
                f"the judge at {self.url} answered with a {err}; not followed, so that the API key is not "
                "sent elsewhere: give --base-url the address it redirects to"
            ) from None
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode("utf-8", "replace").strip()
            if err.code in (401, 403):
                raise JudgeUnavailable(
                    f"the judge at {self.url} refused the request (HTTP {err.code}): {detail}; "
                    f"set the API key in ${API_KEY_ENV[0]} or ${API_KEY_ENV[1]}"
                ) from None
            if err.code == 404:
                raise JudgeUnavailable(f"no chat completions at {self.url} for model {self.model!r} "
                                       f"(HTTP 404): {detail}") from None  # fmt: skip
            if err.code == 429 or err.code >= 500:
                retry_after = err.headers.get("Retry-After") if err.headers else None
                wait = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
                raise _Retryable(f"HTTP {err.code} from the judge: {detail}", retry_after=wait) from None
            raise JudgeError(f"HTTP {err.code} from the judge: {detail}") from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no reply within {self.timeout:g} s", transport=True) from None
            refused = isinstance(reason, (ConnectionRefusedError, socket.gaierror, FileNotFoundError))
            raise _Retryable(f"connection failed ({reason})", fatal=refused, transport=True) from None
        except TimeoutError:
            raise _Retryable(f"no reply within {self.timeout:g} s", transport=True) from None
        except (ConnectionError, http.client.HTTPException, OSError) as err:  # dropped mid-reply
            raise _Retryable(f"connection lost ({type(err).__name__}: {err})", transport=True) from None
        text = body.decode("utf-8", "replace")
        try:
            content = json.loads(text)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError("the judge's HTTP reply is not a chat completion", raw=text[:2000]) from None
        if not isinstance(content, str):
            raise JudgeError("the judge's reply has no text content", raw=text[:2000])
        return content


# --------------------------------------------------------------------- a local transformers model


class LocalModelJudge:
    """A transformers causal LM as judge: :func:`judge_messages` through its chat template, greedy
    decoding of up to ``max_new_tokens``, :func:`parse_verdict` on the text. Not thread-safe: run
    it with concurrency 1 (the runner does)."""

    concurrency = 1

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 512, name: str = "local model") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the judge model {name!r} has no chat template: use an instruction-tuned model")
        self.model, self.tokenizer, self.max_new_tokens, self.name = model, tokenizer, max_new_tokens, name

    @classmethod
    def from_pretrained(cls, name_or_path: str | None, *, max_new_tokens: int = 512, **load_kwargs) -> LocalModelJudge:
        """The judge of :func:`nlft_kernels.recipes.models.load_model` ``(name_or_path)`` (None: the embedded
        SmolLM2)."""
        from nlft_kernels.recipes.models import load_model

        model, tokenizer = load_model(name_or_path, **load_kwargs)
        return cls(model, tokenizer, max_new_tokens=max_new_tokens, name=name_or_path or "smollm2")

    def __call__(self, question: str, response: str, reference_solution: str) -> Judgment:
        import torch

        prompt = self.tokenizer.apply_chat_template(
            judge_messages(question, response, reference_solution), tokenize=False, add_generation_prompt=True
        )
        encoded = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        encoded = encoded.to(next(self.model.parameters()).device)
        with torch.no_grad():
            output = self.model.generate(
                **encoded,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        reply = self.tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        return parse_verdict(reply)
