"""What every task is: problems drawn from disjoint pools, the prompt, the answer reader, the judge.

A task's problems are a pure function of a key (the numbers of an addition, the words of a
review); each key belongs to one split, by a hash of the key (:func:`split_of`), so the train,
validation and test pools are disjoint by construction, whatever seed draws from them.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nlft_kernels.recipes.judgment import Judgment

SPLITS = ("train", "validation", "test")
# Percent of the key space per split: the test pool is large, so that even a small family
# (2-digit x 1-digit multiplication: 720 keys) has ~300 test questions.
SPLIT_SHARES = {"train": 50, "validation": 10, "test": 40}
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_NEXT_QUESTION = re.compile(r"\n\s*Q:")
# Where generation may stop a row of a task read up to its first blank line: the blank line, or a
# question of the model's own (what the reader keeps ends there).
STOP_STRINGS = ("\n\n", "\nQ:")


def split_of(family: str, key: tuple) -> str:
    """The split of problem ``key`` of ``family``: a stable hash (the same on every machine and
    Python), so that pools never overlap and never move."""
    digest = hashlib.blake2b(repr((family, key)).encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 100
    for split in SPLITS:
        if bucket < SPLIT_SHARES[split]:
            return split
        bucket -= SPLIT_SHARES[split]
    raise AssertionError("the split shares add up to 100")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@dataclass(frozen=True)
class Step:
    """One written calculation ``left op right = value`` of a solution (op one of + - *)."""

    left: int
    op: str
    right: int

    @property
    def value(self) -> int:
        return {"+": self.left + self.right, "-": self.left - self.right, "*": self.left * self.right}[self.op]

    def text(self, value: int | None = None, left: int | None = None) -> str:
        """``"27 + 45 = 72"``; ``value``/``left`` replace the result or the left operand (slips)."""
        shown = self.left if left is None else left
        return f"{shown} {self.op} {self.right} = {self.value if value is None else value}"


@dataclass(frozen=True)
class Problem:
    """One question of a task.

    family: the generator (``add2``, ``word1``, ``sentiment`` ...); key: its identity in the
    family's space (what :func:`split_of` hashes); question: the question alone (the worked
    examples are added by :meth:`Task.prompt`); solution: the reference solution, written as a
    right response is (and read by the task's judge); answer: the final answer as text; steps:
    the calculations of an arithmetic solution (the sibling solver's slips change them); label:
    a classification task's class; cues: the words that decide it (its judgments quote them).
    """

    family: str
    key: tuple
    question: str
    solution: str
    answer: str
    steps: tuple[Step, ...] = ()
    label: str | None = None
    cues: tuple[str, ...] = ()
    split: str = field(default="", compare=False)


@dataclass(frozen=True)
class KeySpace:
    """The problems of a family as ``size`` indices: ``key_at(i)`` is the key of index ``i`` (None
    where the index is no valid problem); ``identity(key)`` is what decides the split (the sorted
    operands of an addition, so that 27 + 45 and 45 + 27 land in the same pool)."""

    family: str
    size: int
    key_at: Callable[[int], tuple | None]
    identity: Callable[[tuple], tuple] = lambda key: key

    def split(self, key: tuple) -> str:
        return split_of(self.family, self.identity(key))

    def draw(self, split: str, count: int, seed: int, exclude: Sequence[tuple] = ()) -> list[tuple]:
        """``count`` distinct keys of ``split``, in the order ``random.Random`` of (family, split,
        seed) draws them. Keys whose identity is in ``exclude`` (the worked examples) are never
        drawn. ValueError when the pool is smaller than ``count``."""
        check_split(split)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        rng = random.Random(f"{self.family}:{split}:{seed}")
        banned = {self.identity(k) for k in exclude}
        if self.size <= 200_000:  # small spaces: the exact pool, so that asking too much is an error
            pool = [k for k in dict.fromkeys(self.key_at(i) for i in range(self.size)) if k is not None]
            pool = [k for k in pool if self.identity(k) not in banned and self.split(k) == split]
            if count > len(pool):
                raise ValueError(f"{self.family}: asked for {count} {split} problems, the pool has {len(pool)}")
            return rng.sample(pool, count)
        keys: list[tuple] = []
        seen: set[tuple] = set()
        for _ in range(100 * count + 1000):
            if len(keys) == count:
                return keys
            key = self.key_at(rng.randrange(self.size))
            if key is None or key in seen or self.identity(key) in banned:
                continue
            seen.add(key)
            if self.split(key) == split:
                keys.append(key)
        if len(keys) < count:
            raise ValueError(f"{self.family}: could not draw {count} distinct {split} problems")
        return keys


def before_blank_line(text: str) -> str:
    """The response as the worked examples write it: the text before the first blank line (or
    before a line that starts a new "Q:": a small model goes on with a question of its own),
    without a leading "A:"."""
    text = _BLANK_LINE.split(text.strip(), maxsplit=1)[0]
    text = _NEXT_QUESTION.split(text, maxsplit=1)[0].strip()
    return re.sub(r"^A:\s*", "", text)


class Task:
    """A task: problems from disjoint pools, the prompt a model answers, its reader and judge.

    Subclasses set ``name``, ``instruction`` (the system prompt; None: the prompt templates'
    default), ``max_new_tokens`` (enough for a right response) and implement :meth:`problems`,
    :meth:`prompt` and :meth:`judge`.
    """

    name: str = ""
    description: str = ""
    # The system prompt: the worked examples in the user turn say the format (on a pilot of add2
    # questions it did no worse than the prompt templates' generic instruction).
    instruction: str | None = "Answer the last question in the format of the examples."
    max_new_tokens: int = 32
    # Whether generation may stop at the first blank line (the reader drops the rest).
    stop_at_blank_line: bool = True
    # Whether the prompts start with the same tokens (the worked examples): generation then runs
    # them once per batch and shares their KV cache.
    share_prefix: bool = True
    # Whether code can write this task's responses with chosen mistakes (the sibling solver).
    has_solver: bool = True

    def problems(self, split: str, count: int, seed: int = 0) -> list[Problem]:
        raise NotImplementedError

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The strings that end a row's generation (none: it runs to ``max_new_tokens``)."""
        return STOP_STRINGS if self.stop_at_blank_line else ()

    def prompt(self, problem: Problem) -> str:
        """The user turn the model answers (the worked examples, then the question)."""
        raise NotImplementedError

    def read(self, text: str) -> str:
        """The response a generated ``text`` stands for (what is judged and trained on)."""
        return before_blank_line(text)

    def judge(self, problem: Problem, response: str) -> Judgment:
        raise NotImplementedError

    def judge_row(self, question: str, response: str, reference_solution: str) -> Judgment:
        """The judge on a row's texts (``question``, ``response``, ``answer`` as ``nlft judge``
        reads them; the question may carry the worked examples): a
        :data:`~nlft_kernels.recipes.judgment.JudgeFunction`. Arithmetic and GSM8K: the rule judge."""
        from nlft_kernels.recipes.rule_judge import judge_response

        return judge_response(question, response, reference_solution)

    def reference_response(self, problem: Problem) -> str:
        """The reference solution as a response (SFT on references trains on it)."""
        return problem.solution

    def wrong_spans(self, problem: Problem, response: str) -> list[tuple[int, int]]:
        """Character spans of ``response`` that are wrong, where NLFT should push probability
        down: each number that differs from the number at the same place in the reference
        solution (the responses follow the worked examples' format: the i-th number of a right
        one is the i-th of the reference), and every number past the reference's last."""
        reference = _NUMBER.findall(problem.solution)
        return [
            (m.start(), m.end())
            for i, m in enumerate(_NUMBER.finditer(response))
            if i >= len(reference) or m.group(0) != reference[i]
        ]

    def solve(self, problem: Problem, rng: random.Random, accuracy: float) -> tuple[str, str | None]:
        """A stronger sibling's response: right with probability ``accuracy``, else with one
        realistic slip; returns (response, the slip's kind or None). The tasks with a solver
        (``has_solver``) answer through :func:`.solver.solve`, which reads this module's types."""
        raise NotImplementedError(f"task {self.name!r} has no sibling solver")


_NUMBER = re.compile(r"-?\d+")


def worked_examples(examples: Sequence[Problem], question: str) -> str:
    """The few-shot user turn: ``Q: ...\\nA: ...`` per example, a blank line between, then the question."""
    shots = [f"Q: {p.question}\nA: {p.solution}" for p in examples]
    return "\n\n".join([*shots, f"Q: {question}\nA:"])
