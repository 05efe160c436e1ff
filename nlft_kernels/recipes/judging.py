"""Judging many responses into a JSONL file with any :class:`~nlft_kernels.recipes.judgment.Judge`,
losing nothing on a crash; and :func:`load_judge`, a user's judge function named on the command line.

The output is a :class:`~nlft_kernels.recipes.jsonl_store.JsonlStore`: each result is appended and
flushed as soon as it arrives, so a crash, a kill or Ctrl-C keeps every record finished before it;
a rerun judges only the records the output does not hold yet. A record is known by the content it
copies from its input row (question, response, answer, instruction): after the input was edited,
its rows for edited or deleted lines are dropped (``stale``) and the edited lines judged, so the
output holds exactly the current input's records. One run writes an output at a time (a second one
gets :class:`~nlft_kernels.recipes.jsonl_store.OutputBusy`). A record the judge could not judge (a
malformed reply, a timeout, an HTTP error after the retries) is written with an ``error`` and the
judge's raw reply, never dropped; a rerun tries it again. The input is only read.

When to stop: a judge that cannot be reached (refused connections, a host that does not resolve,
a refused key) stops the run at once; so do ``max_consecutive_failures`` records in a row that got
no reply at all (timeouts, resets: the server is down or hung), since the rest would only time out
too. Ctrl-C, or either stop, sets the judge's ``stop`` event (:class:`OpenAIJudge` has one), so the
requests in flight and their retries end at once; what was written stays.

Output rows: ``id`` (the record's key), ``line`` (1-based line of the input), ``question``,
``response``, ``answer``, ``instruction`` (when the input has one), ``judge``, and then either
``correct``, ``judgment``, ``score`` (and ``raw``, an LLM judge's reply) or ``error``, ``raw``,
``attempts``. :func:`nlft_kernels.training.load_records` reads the file for training and skips the
error rows.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from nlft_kernels.recipes.errors import BadInput
from nlft_kernels.recipes.jsonl_store import JsonlStore, content_keys
from nlft_kernels.recipes.judgment import (
    Judge,
    JudgeError,
    JudgeFunction,
    JudgeStopped,
    JudgeUnavailable,
    Judgment,
    as_judgment,
)
from nlft_kernels.recipes.rule_judge import judge_response

FIELDS = ("question", "response", "answer")
# What an output row copies from its input row: its key hashes these.
KEY_FIELDS = (*FIELDS, "instruction")
# Records in a row with no reply at all (timeouts, resets) after which a run stops.
MAX_CONSECUTIVE_FAILURES = 5


@dataclass
class JudgeRun:
    """What one run did: ``total`` input records, ``skipped`` (judged by an earlier run),
    ``judged`` now (``correct`` + ``wrong``), ``errors`` now, ``retried`` (errors of an earlier
    run tried again), ``stale`` (rows of an earlier run dropped: their input line was edited or
    deleted), ``repaired`` (a last output line cut by a crash, removed)."""

    total: int = 0
    skipped: int = 0
    judged: int = 0
    correct: int = 0
    wrong: int = 0
    errors: int = 0
    retried: int = 0
    stale: int = 0
    repaired: bool = False


@dataclass(frozen=True)
class _Item:
    line: int
    key: str
    row: dict


def judge_name(judge: Judge) -> str:
    """The name written into each row a judge judged (its ``name``, else its function's name)."""
    return str(getattr(judge, "name", None) or getattr(judge, "__name__", type(judge).__name__))


def judge_store(out: str | os.PathLike, judge: Judge | str) -> JsonlStore:
    """The :class:`JsonlStore` of a judged file: rows keyed by ``id``, owned by the judge's name."""
    name = judge if isinstance(judge, str) else judge_name(judge)
    return JsonlStore(out, kind="`nlft judge`", owner_field="judge", owner=name, owner_label="judged by")


def load_judge(spec: str | None) -> JudgeFunction:
    """The judge function named by ``module:function`` (or ``path/to/file.py:function``).

    None or ``builtin`` gives :func:`~nlft_kernels.recipes.rule_judge.judge_response`. The function
    takes ``(question, response, reference_solution)`` and returns a :class:`Judgment`, a
    ``(correct, judgment)`` pair or a dict with ``correct`` and ``judgment``; the result is
    converted to a ``Judgment``. A spec that names no function is a :class:`BadInput`.
    """
    if spec in (None, "", "builtin"):
        return judge_response
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise BadInput(f"--judge must look like module:function or path/to/file.py:function, got {spec!r}")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise BadInput(f"judge file not found: {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise BadInput(f"cannot import judge module {module_name!r}: {err}") from err
    function = getattr(module, function_name, None)
    if not callable(function):
        raise BadInput(f"{module_name!r} has no function {function_name!r}")

    def judge(question: str, response: str, reference_solution: str) -> Judgment:
        return as_judgment(function(question, response, reference_solution))

    judge.__name__ = function_name
    return judge


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
    row = {"id": item.key, "line": item.line} | {k: item.row[k] for k in FIELDS}
    if item.row.get("instruction") is not None:
        row["instruction"] = item.row["instruction"]
    row["judge"] = judge_name
    if isinstance(result, JudgeError):
        return row | {"error": str(result), "raw": result.raw, "attempts": result.attempts}
    row |= {"correct": result.correct, "judgment": result.judgment, "score": result.score}
    return row | ({"raw": result.raw} if result.raw is not None else {})


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
    another judge wrote is refused with a :class:`BadInput`, as is one that is not a judged file or
    that another process is writing). ``concurrency`` judge calls run at once (threads; 1 runs in
    this thread), at most the judge's own ``concurrency`` when it has one. Raises
    :class:`JudgeUnavailable` when the judge cannot be reached, or when
    ``max_consecutive_failures`` records in a row (0: no limit) got no reply at all (their error
    rows are written; what was judged before stays in ``out``); KeyboardInterrupt passes through
    likewise. Either sets the judge's ``stop`` event (when it has one) so that the calls in
    flight end at once, and clears it when they have. ``on_result`` sees each output row after it
    is written; a progress bar (tqdm) on stderr unless ``progress`` is False.
    """
    from tqdm.auto import tqdm

    if concurrency < 1:
        raise BadInput(f"concurrency must be >= 1, got {concurrency}")
    if max_consecutive_failures < 0:
        raise BadInput(f"max_consecutive_failures must be >= 0, got {max_consecutive_failures}")
    # A judge that is not thread-safe says so (LocalModelJudge.concurrency = 1).
    concurrency = min(concurrency, getattr(judge, "concurrency", None) or concurrency)
    numbered = list(rows)
    for line, row in numbered:
        wrong = [k for k in FIELDS if not isinstance(row.get(k), str)]
        if wrong:
            what = ", ".join(f"{k!r} ({'missing' if k not in row else 'not a string'})" for k in wrong)
            raise BadInput(f"line {line}: field {what}")
    keys = content_keys([row for _, row in numbered], KEY_FIELDS)
    items = [_Item(line, key, row) for (line, row), key in zip(numbered, keys, strict=True)]
    name = judge_name(judge)
    with judge_store(out, name) as store:
        resume = store.open(keys, refresh={item.key: {"line": item.line} for item in items}, overwrite=overwrite)
        todo = [item for item in items if item.key not in resume.done]
        run = JudgeRun(total=len(items), skipped=len(items) - len(todo), stale=resume.stale, repaired=resume.repaired)
        run.retried = sum(item.key in resume.retry for item in todo)
        bar = tqdm(total=len(todo), desc="judge", unit="record", dynamic_ncols=True, disable=not progress)
        failures: list[JudgeError] = []  # the records in a row, up to now, that got no reply

        def write(item: _Item, result: Judgment | JudgeError) -> None:
            row = _output_row(item, result, name)
            store.append(row)
            if isinstance(result, JudgeError):
                run.errors += 1
            else:
                run.judged += 1
                run.correct += result.correct
                run.wrong += not result.correct
            bar.set_postfix_str(f"errors {run.errors}", refresh=False)
            bar.update(1)
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
