"""What a judge is and what it returns: the :class:`Judgment` on one response, the :class:`Judge`
protocol every judge follows (the rule judge, the LLM judges, a user's function), and the typed
failures a judge raises.

NLFT needs two things from a judge: is the response correct, and, when it is not, a judgment in
natural language of what is wrong (the judge view's prompt quotes it). Failures are typed so that
a run can keep every record: :class:`JudgeError` (this record has no verdict: a malformed reply, a
timeout, an HTTP error after the retries; the runner writes it as an error on the record;
``transport`` when no reply came at all), :class:`JudgeUnavailable` (no record can be judged: the
server cannot be reached or refuses the key; the run stops) and :class:`JudgeStopped` (the run is
ending: Ctrl-C or another record's fatal error set the judge's ``stop`` event; nothing is written
for the record).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from nlft_kernels.recipes.errors import RunStopped

# Scores: 1 for a correct response; a right final answer with a wrong step is half right; a wrong
# but extractable answer gets ReFT's partial reward 0.1; no answer at all gets 0.
SCORE_CORRECT, SCORE_WRONG_STEP, SCORE_WRONG_ANSWER, SCORE_NO_ANSWER = 1.0, 0.5, 0.1, 0.0


@dataclass(frozen=True)
class Judgment:
    """The verdict on one response: ``judgment`` is None for a correct one; ``raw`` is an LLM
    judge's reply as it came (kept for audit, not compared)."""

    correct: bool
    judgment: str | None
    score: float
    raw: str | None = field(default=None, compare=False, repr=False)


JudgeFunction = Callable[[str, str, str], Judgment]


@runtime_checkable
class Judge(Protocol):
    """What every judge is: ``(question, response, reference_solution) -> Judgment``.

    Raises :class:`JudgeError` when this record gets no verdict, :class:`JudgeUnavailable` when
    no record can get one. Optional attributes the runner reads: ``name`` (written into each
    judged record), ``concurrency`` (the most calls at once it allows: 1 when not thread-safe) and
    ``stop`` (a ``threading.Event`` that ends its calls in flight).
    """

    def __call__(self, question: str, response: str, reference_solution: str) -> Judgment: ...


class JudgeError(Exception):
    """One record got no verdict; ``raw`` is the judge's reply when there was one; ``transport``
    when its last attempt got no reply at all (a timeout, a reset or dropped connection)."""

    def __init__(self, message: str, raw: str | None = None, attempts: int = 1, transport: bool = False) -> None:
        super().__init__(message)
        self.raw, self.attempts, self.transport = raw, attempts, transport


class JudgeUnavailable(RunStopped):
    """No record can be judged (server unreachable, key refused, no such endpoint or model)."""


class JudgeStopped(Exception):
    """The run is ending (the judge's ``stop`` event is set): this record was left unjudged."""


def as_judgment(result: object) -> Judgment:
    """A user judge's result as a :class:`Judgment`: a Judgment as is, a ``(correct, judgment[,
    score])`` pair, a dict or an object with ``correct`` and ``judgment`` (TypeError otherwise)."""
    if isinstance(result, Judgment):
        return result
    if isinstance(result, dict):
        correct, judgment = result.get("correct"), result.get("judgment")
        score = result.get("score")
    elif isinstance(result, (tuple, list)) and len(result) in (2, 3):
        correct, judgment = result[0], result[1]
        score = result[2] if len(result) == 3 else None
    elif hasattr(result, "correct"):
        correct, judgment, score = result.correct, getattr(result, "judgment", None), getattr(result, "score", None)
    else:
        raise TypeError(f"a judge must return a Judgment, (correct, judgment) or a dict, got {type(result).__name__}")
    if not isinstance(correct, bool):
        raise TypeError(f"a judge's 'correct' must be a bool, got {correct!r}")
    if judgment is not None and not isinstance(judgment, str):
        raise TypeError(f"a judge's 'judgment' must be a str or None, got {type(judgment).__name__}")
    if score is None:
        score = SCORE_CORRECT if correct else SCORE_WRONG_ANSWER
    return Judgment(correct, None if correct else judgment, float(score))
