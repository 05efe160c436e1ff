"""Judge servers for the tests: a stub OpenAI-compatible HTTP server in a thread (faults on
demand: slow, HTTP 500, garbage, headers), the inputs and answers the judge tests share, and
llama-cpp-python's real server on the embedded SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REQUIRE_SERVER_ENV = "NLFT_REQUIRE_LLM_SERVER"
# CI builds llama-cpp-python while the other tests run and writes this file when it is installed
# ("ok") or has failed (why); the real-server tests wait for it (.ci/run).
READY_FILE_ENV = "NLFT_LLM_SERVER_READY_FILE"
READY_WAIT_S = 1500


QUESTION = "Janet has 16 eggs, eats 3 and bakes with 4. She sells the rest at $2 each. How much does she make?"
REFERENCE = "16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n9 * 2 = $<<9*2=18>>18\n#### 18"
REPLY_WRONG = "The step 16 - 3 = 12 is wrong: 16 - 3 is 13. The correct answer is 18.\nVerdict: wrong"
REPLY_RIGHT = "The response is correct.\nVerdict: correct"


def rows(n: int) -> list[tuple[int, dict]]:
    """n distinct (line, row) inputs, question ``QUESTION (#i)``: even ones right, odd ones wrong."""
    out = []
    for i in range(n):
        response = "16 - 3 - 4 = 9. 9 * 2 = 18. The answer is 18." if i % 2 == 0 else f"The answer is {20 + i}."
        out.append((i + 1, {"question": f"{QUESTION} (#{i})", "response": response, "answer": REFERENCE}))
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def ok(number: int, body: dict) -> tuple[int, bytes, float]:
    """A stub's answer: wrong for the questions of :func:`rows` with an odd #, right otherwise."""
    odd = int(body["messages"][1]["content"].split("(#")[1].split(")")[0]) % 2
    return 200, chat_reply(REPLY_WRONG if odd else REPLY_RIGHT), 0.0


def chat_reply(content: str) -> bytes:
    """An OpenAI chat-completions body whose message is ``content``."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    return json.dumps({"id": "stub", "object": "chat.completion", "choices": [choice]}).encode()


class StubServer:
    """``handle(request_number, body) -> (status, bytes, delay_s[, headers])`` answers each POST;
    counts requests, keeps their headers, bodies and arrival times (``time.monotonic``), and the most
    requests it had in flight at once. ``drip``: seconds between the bytes of each reply's body (0:
    the body at once), for a server that is slow but alive. ``closed`` counts the requests whose
    client hung up before the reply was sent (a cancelled request)."""

    def __init__(self, handle: Callable[[int, dict], tuple[int, bytes, float]], drip: float = 0.0) -> None:
        self.handle, self.requests, self.in_flight, self.max_in_flight, self.closed = handle, [], 0, 0, 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    number = len(stub.requests)
                    stub.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body, "at": time.monotonic()}
                    )
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    status, data, delay, *headers = stub.handle(number, body)
                    _wait_or_hang_up(self.connection, delay)
                    self.send_response(status)
                    for name, value in (headers[0] if headers else {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if not drip:
                        self.wfile.write(data)
                    for i in range(len(data) if drip else 0):
                        self.wfile.write(data[i : i + 1])
                        self.wfile.flush()
                        time.sleep(drip)
                except (BrokenPipeError, ConnectionResetError, _HungUp):  # the client timed out or left
                    with stub.lock:
                        stub.closed += 1
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class _HungUp(Exception):
    """The client closed the connection while its request waited for the reply."""


def _wait_or_hang_up(connection: socket.socket, delay: float) -> None:
    """Sleep ``delay`` seconds, or until the client closes the connection (a cancelled request)."""
    deadline = time.monotonic() + delay
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([connection], [], [], min(left, 0.05))
        if ready and not connection.recv(1, socket.MSG_PEEK):
            raise _HungUp


def free_port() -> int:
    """A localhost port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------- the real llama.cpp server


def _wait_for_ci_install() -> None:
    """Where READY_FILE_ENV names a file (CI), wait until the background install has written it."""
    ready = os.environ.get(READY_FILE_ENV)
    if not ready:
        return
    deadline = time.monotonic() + READY_WAIT_S
    while not Path(ready).exists():
        if time.monotonic() > deadline:
            pytest.fail(f"llama-cpp-python[server] not installed within {READY_WAIT_S} s ({READY_FILE_ENV}={ready})")
        time.sleep(2)
    status = Path(ready).read_text(encoding="utf-8", errors="replace").strip()
    if status != "ok":
        pytest.fail(f"installing llama-cpp-python[server] failed: {status}")
    importlib.invalidate_caches()  # installed after this process started


def llama_server_or_skip() -> str:
    """The GGUF file the server will serve; skips (fails under NLFT_REQUIRE_LLM_SERVER=1) when
    llama-cpp-python's server or the embedded model is missing."""
    required = os.environ.get(REQUIRE_SERVER_ENV, "0") == "1"

    def missing(reason: str):
        if required:
            pytest.fail(f"{reason}, and {REQUIRE_SERVER_ENV}=1 requires the llama.cpp server tests to run")
        pytest.skip(reason)

    _wait_for_ci_install()
    for module, what in (("llama_cpp", "llama-cpp-python"), ("uvicorn", "llama-cpp-python[server]")):
        if importlib.util.find_spec(module) is None:
            missing(f"{what} is not installed (pip install 'llama-cpp-python[server]')")
    from nlft_kernels.recipes.models import smollm2_gguf

    try:
        folder, name = smollm2_gguf()
    except RuntimeError as err:
        missing(str(err))
    return str(Path(folder) / name)


class LlamaServer:
    """``python -m llama_cpp.server`` serving ``gguf`` on a free localhost port, as model ``smollm2``."""

    MODEL = "smollm2"

    def __init__(self, gguf: str, log: Path, n_ctx: int = 2048) -> None:
        self.port = free_port()
        self.log_path = log
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", self.MODEL]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", "2"]
        self.log = open(log, "wb")
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(timeout=180)
        except BaseException:
            self.stop()
            raise

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the llama.cpp server exited ({self.process.returncode}): {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the llama.cpp server did not answer within {timeout} s: {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
