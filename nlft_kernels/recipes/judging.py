"""Judge many responses with any :class:`nlft_kernels.recipes.llm_judge.Judge`, losing nothing on a crash.

Each result is appended to the output JSONL and flushed as soon as it arrives, so a crash, a kill
or Ctrl-C keeps every record finished before it; a rerun reads the output first and judges only
the records it does not hold yet (a record is known by its input line and a hash of its question,
response and reference, so an edited input is judged again). A record the judge could not judge
(a malformed reply, a timeout, an HTTP error after the retries) is written with an ``error`` and
the judge's raw reply, never dropped; a rerun tries it again. The input is only read.

When to stop: a judge that cannot be reached (refused connections, a host that does not resolve,
a refused key) stops the run at once; so do ``max_consecutive_failures`` records in a row that got
no reply at all (timeouts, resets: the server is down or hung), since the rest would only time
out too. Ctrl-C, or either stop, sets the judge's ``stop`` event (:class:`OpenAIJudge` has one), so
the requests in flight and their retries end at once; what was written stays.

Output rows: ``id``, ``line`` (1-based line of the input), ``question``, ``response``, ``answer``,
``instruction`` (when the input has one), ``judge``, and then either ``correct``, ``judgment``,
``score`` (and ``raw``, an LLM judge's reply) or ``error``, ``raw``, ``attempts``.
:func:`nlft_kernels.training.load_records` reads the file for training and skips the error rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from nlft_kernels.recipes.rule_judge import Judgment, as_judgment
from nlft_kernels.recipes.llm_judge import Judge, JudgeError, JudgeStopped, JudgeUnavailable

FIELDS = ("question", "response", "answer")
# Records in a row with no reply at all (timeouts, resets) after which a run stops.
MAX_CONSECUTIVE_FAILURES = 5


def record_id(question: str, response: str, answer: str) -> str:
    """A short hash that tells one (question, response, reference) from another."""
    digest = hashlib.sha256("\x1f".join((question, response, answer)).encode("utf-8")).hexdigest()
    return digest[:16]


@dataclass
class JudgeRun:
    """What one run did: ``total`` input records, ``skipped`` (judged by an earlier run),
    ``judged`` now (``correct`` + ``wrong``), ``errors`` now, ``retried`` (errors of an earlier
    run tried again), ``repaired`` (a last output line cut by a crash, removed)."""

    total: int = 0
    skipped: int = 0
    judged: int = 0
    correct: int = 0
    wrong: int = 0
    errors: int = 0
    retried: int = 0
    repaired: bool = False


@dataclass(frozen=True)
class _Item:
    line: int
    key: str
    row: dict


def read_judged(out: str | os.PathLike, judge: str | None = None) -> tuple[set[str], set[str], bool]:
    """(keys judged, keys with only errors so far, whether a cut last line was removed) of an
    output file. Every line is checked first: a file that is not an output of `nlft judge`, or
    (``judge`` given) one whose rows another judge wrote, is refused untouched (resuming would mix
    two judges' verdicts). Then a last line without its newline: a whole row keeps its record and
    gets its newline; a row a crash cut short is removed (appending after it would corrupt the
    next record) and its record is judged again."""
    path = Path(out)
    if not path.is_file():
        return set(), set(), False
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")  # tail: b"" when the file ends with its newline
    rows = [(number, line.decode("utf-8")) for number, line in enumerate(lines, 1) if line.strip()]
    tail_row = None
    if tail.strip():
        try:  # a crash may cut a character in two: decoded leniently, then parsed
            tail_row = _row(path, len(lines) + 1, tail.decode("utf-8", "replace"))
        except ValueError:
            if not tail.lstrip().startswith(b'{"id"'):  # not one of our rows cut short: not ours
                raise
    judged, errored = set(), set()
    numbered = [(number, _row(path, number, line)) for number, line in rows]
    for number, row in numbered + ([(len(lines) + 1, tail_row)] if tail_row else []):
        if judge is not None and row.get("judge") not in (None, judge):
            raise ValueError(
                f"{path}, line {number}: judged by {row['judge']!r}, not by this judge ({judge!r}); resuming "
                "would mix two judges' verdicts: use a new --out (or --overwrite to start it afresh)"
            )
        key = f"{row['line']}:{row['id']}"
        (errored if row.get("error") else judged).add(key)
    repaired = False
    if tail.strip() and tail_row is not None:
        with open(path, "ab") as f:  # a whole row: only its newline was lost
            f.write(b"\n")
    elif tail.strip():
        with open(path, "rb+") as f:
            f.truncate(len(data) - len(tail))
        repaired = True
    return judged, errored - judged, repaired


def _row(path: Path, number: int, line: str) -> dict:
    """The output row on ``line``; ValueError if it is not one of `nlft judge`'s."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}); not an output of `nlft judge`?") from err
    if not isinstance(row, dict) or "id" not in row or "line" not in row:
        raise ValueError(f"{path}, line {number}: no 'id' and 'line': not an output of `nlft judge`")
    return row


def _judge_one(judge: Judge, row: dict) -> Judgment | JudgeError:
    """The judge's verdict, or the error that replaces it on this record (never raised, except
    :class:`JudgeUnavailable`, :class:`JudgeStopped` and interrupts, which end the run)."""
    try:
        result = judge(row["question"], row["response"], row["answer"])
    except (JudgeUnavailable, JudgeStopped, KeyboardInterrupt):
        raise
    except JudgeError as err:
        return err
    except Exception as err:  # a user judge's bug: recorded on its record, visible, not lost
        return JudgeError(f"{type(err).__name__}: {err}")
    try:
        result = as_judgment(result)  # a Judgment as is; a (correct, judgment) pair or dict converted
    except TypeError as err:
        return JudgeError(str(err))
    if not result.correct and not (isinstance(result.judgment, str) and result.judgment.strip()):
        # NLFT's judge view needs the judgment: the trainer could not read this row (as parse_verdict)
        return JudgeError("the judge says wrong but gives no judgment of the errors", raw=result.raw)
    return result


def _output_row(item: _Item, result: Judgment | JudgeError, judge_name: str) -> dict:
    row = {"id": item.key.split(":", 1)[1], "line": item.line}
    row |= {k: item.row[k] for k in FIELDS}
    if item.row.get("instruction") is not None:
        row["instruction"] = item.row["instruction"]
    row["judge"] = judge_name
    if isinstance(result, JudgeError):
        return row | {"error": str(result), "raw": result.raw, "attempts": result.attempts}
    row |= {"correct": result.correct, "judgment": result.judgment, "score": result.score}
    return row | ({"raw": result.raw} if result.raw is not None else {})


class _Progress:
    """tqdm's bar (records, rate, ETA) when tqdm is installed, else a line every few seconds."""

    def __init__(self, total: int, enabled: bool, desc: str = "judge") -> None:
        self.total, self.done, self.errors, self.started, self.last = total, 0, 0, time.monotonic(), 0.0
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=desc, unit="record", dynamic_ncols=True)

    def update(self, error: bool) -> None:
        self.done += 1
        self.errors += error
        if self.bar is not None:
            self.bar.set_postfix_str(f"errors {self.errors}", refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if self.enabled and (now - self.last > 5 or self.done == self.total):
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"judge: {self.done}/{self.total} records, {rate:.2f} records/s, ETA {eta:.0f} s, "
                  f"errors {self.errors}", file=sys.stderr, flush=True)  # fmt: skip
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def judge_rows(
    rows: Iterable[tuple[int, dict]],
    judge: Judge,
    out: str | os.PathLike,
    *,
    concurrency: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    on_result: Callable[[dict], None] | None = None,
    max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES,
) -> JudgeRun:
    """Judge ``rows`` ((1-based input line, dict with question, response, answer), ...) into ``out``.

    Resumes from what ``out`` holds unless ``overwrite`` (each row names its judge: an ``out``
    another judge wrote is refused with a ValueError). ``concurrency`` judge calls run at once
    (threads; 1 runs in this thread), at most the judge's own ``concurrency`` when it has one.
    Raises :class:`JudgeUnavailable` when the judge cannot be reached, or when
    ``max_consecutive_failures`` records in a row (0: no limit) got no reply at all (their error
    rows are written; what was judged before stays in ``out``); KeyboardInterrupt passes through
    likewise. Either sets the judge's ``stop`` event (when it has one) so that the calls in
    flight end at once, and clears it when they have.
    ``on_result`` sees each output row after it is written.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if max_consecutive_failures < 0:
        raise ValueError(f"max_consecutive_failures must be >= 0, got {max_consecutive_failures}")
    # A judge that is not thread-safe says so (LocalModelJudge.concurrency = 1).
    concurrency = min(concurrency, getattr(judge, "concurrency", None) or concurrency)
    out = Path(out)
    items: list[_Item] = []
    for line, row in rows:
        missing = [k for k in FIELDS if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"line {line}: missing field {', '.join(repr(k) for k in missing)}")
        items.append(_Item(line, f"{line}:{record_id(*(row[k] for k in FIELDS))}", row))
    if overwrite and out.exists():
        out.unlink()
    name = str(getattr(judge, "name", None) or getattr(judge, "__name__", type(judge).__name__))
    judged, errored, repaired = read_judged(out, judge=name)
    todo = [item for item in items if item.key not in judged]
    run = JudgeRun(total=len(items), skipped=len(items) - len(todo), repaired=repaired)
    run.retried = sum(item.key in errored for item in todo)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = _Progress(len(todo), progress)
    failures: list[JudgeError] = []  # the records in a row, up to now, that got no reply
    with open(out, "a", encoding="utf-8") as f:

        def write(item: _Item, result: Judgment | JudgeError) -> None:
            row = _output_row(item, result, name)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()  # a kill after this line keeps the record
            if isinstance(result, JudgeError):
                run.errors += 1
            else:
                run.judged += 1
                run.correct += result.correct
                run.wrong += not result.correct
            bar.update(isinstance(result, JudgeError))
            if on_result is not None:
                on_result(row)
            failures[:] = [*failures, result] if isinstance(result, JudgeError) and result.transport else []
            if max_consecutive_failures and len(failures) >= max_consecutive_failures:
                raise JudgeUnavailable(
                    f"cannot reach the judge {name}: the last {len(failures)} records got no reply "
                    f"(the last: {failures[-1]}); the server looks down or too slow for the timeout"
                )

        try:
            _run(todo, judge, write, min(concurrency, max(1, len(todo))))
        finally:
            bar.close()
    return run


def _run(todo: Sequence[_Item], judge: Judge, write, concurrency: int) -> None:
    stop = getattr(judge, "stop", None)
    stop = stop if isinstance(stop, threading.Event) else None
    if concurrency == 1:
        try:
            for item in todo:
                write(item, _judge_one(judge, item.row))
        finally:
            if stop is not None:
                stop.clear()  # nothing in flight now: the judge works again
        return
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="nlft-judge")
    try:
        futures = {pool.submit(_judge_one, judge, item.row): item for item in todo}
        # Results are written by this thread only, in the order they arrive.
        for future in as_completed(futures):
            write(futures[future], future.result())
    except BaseException:
        # Queued calls never start; the ones in flight end at once through the judge's stop
        # event (their retries and backoff included), so the run ends now, not after them. A
        # judge without one is not waited for (its calls end on their own).
        if stop is not None:
            stop.set()
        try:
            pool.shutdown(wait=stop is not None, cancel_futures=True)
        finally:
            if stop is not None:
                stop.clear()
        raise
    pool.shutdown(wait=True)
