"""LLM judges: a model behind any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp's
server, OpenAI) through the ``openai`` client, and a local transformers model. Both send
:func:`~nlft_kernels.recipes.judge_prompt.judge_messages` and read the reply with
:func:`~nlft_kernels.recipes.judge_prompt.parse_verdict`.

The server's address and key follow the ``openai`` client's conventions: ``base_url`` (else
``$OPENAI_BASE_URL``, else OpenAI's API) and the key from ``$NLFT_JUDGE_API_KEY``, else
``$OPENAI_API_KEY`` (or the variable ``--api-key-env`` names; never a command-line flag, which
``ps`` and shell history show). Credentials stay out of what is shown and stored: a base URL with a
user name or password is refused without being echoed, and server bodies and messages written to
the output have keys, Bearer tokens and ``key=`` query values redacted (:func:`redact`).

Needs the ``openai`` package (the ``train`` extra), imported only when an :class:`OpenAIJudge` is made.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import math
import os
import random
import re
import threading
import urllib.request
import warnings
from collections.abc import Iterable
from urllib.parse import urlsplit

from nlft_kernels.recipes.errors import BadInput
from nlft_kernels.recipes.judge_prompt import judge_messages, parse_verdict
from nlft_kernels.recipes.judgment import JudgeError, JudgeStopped, JudgeUnavailable, Judgment

# The environment variables the API key is read from, first set wins.
API_KEY_ENV = ("NLFT_JUDGE_API_KEY", "OPENAI_API_KEY")
BASE_URL_ENV = "OPENAI_BASE_URL"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# Longest wait between two attempts (the backoff's and a server's Retry-After alike).
MAX_WAIT_S = 30.0
# For servers that constrain decoding to a schema (llama.cpp, vLLM, SGLang, OpenAI).
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"judgment": {"type": "string"}, "correct": {"type": "boolean"}},
    "required": ["judgment", "correct"],
}
REDACTED = "[redacted]"


# ---------------------------------------------------------------------------- credentials


def api_key_from_env(name: str | None = None) -> str | None:
    """The API key in the environment variable ``name``, else in the first set of :data:`API_KEY_ENV`.

    A ``name`` that is unset or empty gives None with a warning, never another variable's key
    (that one may belong to another server)."""
    if name:
        value = os.environ.get(name)
        if not value:
            warnings.warn(
                f"${name} (named for the judge's API key) is not set or empty: no API key is sent", stacklevel=2
            )
        return value or None
    return next((os.environ[n] for n in API_KEY_ENV if os.environ.get(n)), None)


def check_base_url(base_url: str) -> str:
    """``base_url`` (as for the ``openai`` client, e.g. ``http://host:8000/v1``) without a trailing
    ``/`` or ``/chat/completions``; :class:`BadInput` for a URL that is not http(s), has a query or
    carries a user name or password (refused without echoing it: it holds a secret)."""
    try:
        parts = urlsplit(base_url.strip())
        has_user_info = parts.username is not None or parts.password is not None
    except ValueError:
        raise BadInput("the judge's base URL cannot be parsed") from None
    if has_user_info:
        raise BadInput(
            "the judge's base URL holds a user name or password (user:password@host): it is neither sent nor "
            f"shown; give the key in ${API_KEY_ENV[0]} (or name its variable with --api-key-env)"
        )
    if parts.query or parts.fragment:
        raise BadInput(
            "the judge's base URL has a query string or fragment (not shown: it may hold a key); give the "
            f"server's root, e.g. http://host:8000/v1, and the key in ${API_KEY_ENV[0]}"
        )
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadInput(f"the judge's base URL must start with http:// or https://, got {base_url!r}")
    url = base_url.strip().rstrip("/")
    return url.removesuffix("/chat/completions")


_BEARER = re.compile(r"(\bBearer\s+)[^\s\"',;]+", re.IGNORECASE)
_KEY_PARAM = re.compile(
    r"(\b(?:api[_-]?key|access[_-]?token|token|key|secret|password|auth)\s*=\s*)[^&\s\"',;]+", re.IGNORECASE
)
_KEY_FIELD = re.compile(
    r"(\"(?:api[_-]?key|access[_-]?token|token|key|secret|password|authorization)\"\s*:\s*\")[^\"]*", re.IGNORECASE
)
_USER_INFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.IGNORECASE)
_OPENAI_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-]{12,}")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with credentials replaced by ``[redacted]``: each of ``secrets`` (4 characters or
    more) wherever it appears, Bearer tokens, ``key=``/``token=``... values, JSON ``"api_key"``
    fields, the user info of URLs and OpenAI-style ``sk-`` keys."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    text = _BEARER.sub(rf"\1{REDACTED}", text)
    text = _KEY_PARAM.sub(rf"\1{REDACTED}", text)
    text = _KEY_FIELD.sub(rf"\1{REDACTED}", text)
    text = _USER_INFO.sub(rf"\1{REDACTED}@", text)
    return _OPENAI_KEY.sub(REDACTED, text)


# ------------------------------------------------------------------ the openai client's parts

# The attempts of the request the current task makes (the transport appends one per attempt).
_ATTEMPTS: contextvars.ContextVar[list[int]] = contextvars.ContextVar("nlft_judge_attempts")


def _http_module(openai):
    """The HTTP library the installed ``openai`` is built on (httpx2, or httpx before it)."""
    import importlib

    return importlib.import_module(openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0])


def _environment_proxy(url: str) -> str | None:
    """The proxy ``$HTTPS_PROXY``/``$HTTP_PROXY``/``$ALL_PROXY`` name for ``url``, unless ``$NO_PROXY``
    exempts its host: a client given its own transport no longer reads them itself."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


class _AttemptDeadline:
    """An HTTP transport around the real one: each attempt ends within ``timeout`` seconds in all
    (connect, headers and the whole body: a server that drips its reply still times out, which
    per-read timeouts miss), as the library's own timeout error so that the client retries it."""

    def __init__(self, http, timeout: float, proxy: str | None = None) -> None:
        self.http, self.timeout, self.inner = http, timeout, http.AsyncHTTPTransport(proxy=proxy)

    async def handle_async_request(self, request):
        attempts = _ATTEMPTS.get(None)
        if attempts is not None:
            attempts.append(1)
        try:
            return await asyncio.wait_for(self._exchange(request), self.timeout)
        except (TimeoutError, asyncio.TimeoutError):  # noqa: UP041 (two classes before Python 3.11)
            raise self.http.ReadTimeout(f"no reply within {self.timeout:g} s", request=request) from None

    async def _exchange(self, request):
        response = await self.inner.handle_async_request(request)
        try:  # the raw bytes: the client decodes them (gzip) as it would have
            body = b"".join([chunk async for chunk in response.aiter_raw()])
        finally:
            await response.aclose()
        return self.http.Response(
            response.status_code, headers=response.headers, content=body, extensions=response.extensions
        )

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def _client_class(openai):
    """``openai.AsyncOpenAI`` waiting ``backoff * 2**retry`` seconds between attempts (10% jitter),
    or a server's Retry-After, both capped at :data:`MAX_WAIT_S`: ``--backoff``'s meaning. What is
    retried (timeouts, dropped connections, HTTP 408/409/429/5xx) and how often is the client's."""

    class _Client(openai.AsyncOpenAI):
        backoff = 1.0

        def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None) -> float:
            retry_after = self._parse_retry_after_header(response_headers)
            if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
                return min(retry_after, MAX_WAIT_S)
            retry = options.get_max_retries(self.max_retries) - remaining_retries
            return min(MAX_WAIT_S, self.backoff * 2.0 ** min(retry, 30) * (1 + 0.1 * random.random()))

    return _Client


# ---------------------------------------------------------------------------- the server judge


class OpenAIJudge:
    """An LLM judge behind an OpenAI-compatible ``/chat/completions`` endpoint, through ``openai.AsyncOpenAI``.

    Each call sends :func:`judge_messages` and parses the reply. ``timeout`` seconds per attempt,
    in all; up to ``max_retries`` more attempts after a timeout, a dropped connection, HTTP 408,
    409, 429 or 5xx (the client's retries), waiting as :func:`_client_class` says. After the last
    attempt a connection that cannot be made (refused, a host that does not resolve) raises
    :class:`JudgeUnavailable`; the rest raise :class:`JudgeError` (``transport`` when no reply
    came), as do a body that is not a chat completion and a reply with no verdict (not retried: at
    temperature 0 it would come back the same). HTTP 401/403/404 and a redirect (never followed:
    it would carry the API key elsewhere) raise :class:`JudgeUnavailable` at once.

    Thread-safe: the calls of all threads run on one event loop in a daemon thread. ``stop`` (a
    ``threading.Event``; the runner sets it when a run ends early, e.g. on Ctrl-C) ends the calls
    in flight within :attr:`POLL_S` with :class:`JudgeStopped`: their requests are cancelled (the
    connection closed) and so are their waits between attempts.

    ``response_format``: ``text`` (default, any server), ``json_object`` (with the verdict schema,
    as llama.cpp's server and vLLM constrain it) or ``json_schema`` (OpenAI's structured outputs).
    """

    POLL_S = 0.05  # how often a waiting call looks at ``stop``

    def __init__(
        self,
        base_url: str | None,
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
    ) -> None:
        numbers = {"timeout": timeout, "backoff": backoff, "temperature": temperature}
        for what, value in numbers.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise BadInput(f"the judge's {what} must be a finite number >= 0, got {value!r}")
        if timeout <= 0 or max_tokens < 1 or max_retries < 0:
            raise BadInput("the judge's timeout and max_tokens must be positive, max_retries >= 0")
        if response_format not in RESPONSE_FORMATS:
            raise BadInput(f"response_format must be one of {RESPONSE_FORMATS}, got {response_format!r}")
        try:
            import openai
        except ImportError as err:
            raise ImportError(
                "the LLM judge needs the openai package: pip install openai (or nlft-kernels[train])"
            ) from err
        self.base_url = check_base_url(base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL)
        self.url = self.base_url + "/chat/completions"
        self.model, self.api_key, self.timeout, self.max_retries = model, api_key, float(timeout), max_retries
        self.max_tokens, self.temperature, self.response_format, self.seed = (
            max_tokens,
            temperature,
            response_format,
            seed,
        )
        self.name = f"{model} at {self.base_url}"
        self.stop = threading.Event()
        self._openai = openai
        http = _http_module(openai)
        self._client = _client_class(openai)(
            api_key=api_key or "unused",  # with no key, the Authorization header is left out per request
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=max_retries,
            http_client=openai.DefaultAsyncHttpxClient(
                transport=_AttemptDeadline(http, self.timeout, _environment_proxy(self.base_url)),
                follow_redirects=False,
                timeout=self.timeout,
            ),
        )
        self._client.backoff = backoff
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()

    def __call__(self, question: str, response: str, reference_solution: str) -> Judgment:
        messages = judge_messages(question, response, reference_solution, json_reply=self.response_format != "text")
        reply, attempts = self.complete(messages)
        try:
            return parse_verdict(reply)
        except JudgeError as err:
            err.attempts = attempts
            raise

    def request(self, messages: list[dict]) -> dict:
        """The keyword arguments of ``chat.completions.create`` for ``messages``."""
        kwargs: dict = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens}
        kwargs |= {"temperature": self.temperature}
        if self.seed is not None:
            kwargs["seed"] = self.seed
        if not self.api_key:
            kwargs["extra_headers"] = {"Authorization": self._openai.Omit()}
        if self.response_format == "json_object":  # llama.cpp's and vLLM's schema-constrained JSON
            kwargs["extra_body"] = {"response_format": {"type": "json_object", "schema": VERDICT_SCHEMA}}
        elif self.response_format == "json_schema":
            schema = {"name": "verdict", "schema": VERDICT_SCHEMA | {"additionalProperties": False}, "strict": True}
            kwargs["response_format"] = {"type": "json_schema", "json_schema": schema}
        return kwargs

    def complete(self, messages: list[dict]) -> tuple[str, int]:
        """(the reply's text, attempts made) for ``messages``; ends at once when ``stop`` is set."""
        if self.stop.is_set():
            raise JudgeStopped("the run is stopping")
        future = asyncio.run_coroutine_threadsafe(self._complete(messages), self._event_loop())
        try:
            while not concurrent.futures.wait([future], timeout=self.POLL_S).done:
                if self.stop.is_set():
                    raise JudgeStopped("the run is stopping")
        finally:
            future.cancel()  # Ctrl-C or stop: the request in flight or the wait before the next attempt ends
        return future.result()

    def close(self) -> None:
        """Close the client's connections and end the event loop's thread."""
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._client.close(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="nlft-judge-client", daemon=True).start()
                self._loop = loop
            return self._loop

    async def _complete(self, messages: list[dict]) -> tuple[str, int]:
        openai, attempts = self._openai, []
        _ATTEMPTS.set(attempts)  # this task's own context
        try:
            reply = await self._client.chat.completions.with_raw_response.create(**self.request(messages))
            text = reply.http_response.text
        except openai.APIStatusError as err:
            raise self._status_error(err, len(attempts)) from None
        except openai.APITimeoutError:
            raise JudgeError(f"no reply within {self.timeout:g} s{_after(len(attempts))}",
                             attempts=len(attempts), transport=True) from None  # fmt: skip
        except openai.APIConnectionError as err:
            cause = err.__cause__
            why = self._redact(f"{type(cause).__name__}: {cause}" if cause else str(err))
            if type(cause).__name__ == "ConnectError":  # refused, a name that does not resolve: no server
                raise JudgeUnavailable(
                    f"cannot reach the judge at {self.url}: connection failed ({why}){_after(len(attempts))}"
                ) from None
            raise JudgeError(f"connection lost ({why}){_after(len(attempts))}",
                             attempts=len(attempts), transport=True) from None  # fmt: skip
        return self._content(text), len(attempts)

    def _status_error(self, err, attempts: int) -> Exception:
        """The error an HTTP error status becomes, its body redacted."""
        status, body = err.status_code, self._redact(err.response.text)
        detail = body[:300].strip()
        if 300 <= status < 400:
            location = self._redact(err.response.headers.get("location", "?"))
            return JudgeUnavailable(
                f"the judge at {self.url} answered with a redirect (HTTP {status}) to {location}; not followed, so "
                "that the API key is not sent elsewhere: give --base-url the address it redirects to"
            )
        if status in (401, 403):
            return JudgeUnavailable(
                f"the judge at {self.url} refused the request (HTTP {status}): {detail}; set the API key in "
                f"${API_KEY_ENV[0]} or ${API_KEY_ENV[1]} (or name its variable with --api-key-env)"
            )
        if status == 404:
            return JudgeUnavailable(f"no chat completions at {self.url} for model {self.model!r} (HTTP 404): {detail}")
        return JudgeError(
            f"HTTP {status} from the judge: {detail}{_after(attempts)}", raw=body[:2000], attempts=attempts
        )

    def _content(self, text: str) -> str:
        """The reply's message text out of a chat-completion body."""
        try:
            content = json.loads(text)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError("the judge's HTTP reply is not a chat completion", raw=self._redact(text)[:2000]) from None
        if not isinstance(content, str):
            raise JudgeError("the judge's reply has no text content", raw=self._redact(text)[:2000])
        return content

    def _redact(self, text: str) -> str:
        return redact(text, [self.api_key])


def _after(attempts: int) -> str:
    return f" (after {attempts} attempt{'s' * (attempts != 1)})" if attempts else ""


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
