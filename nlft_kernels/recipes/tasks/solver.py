"""A stronger sibling, written in code: right with a chosen probability, otherwise one realistic slip.

The authors train on responses of a stronger sibling (Llama-3-8B-Instruct at T=0.3, mostly
right). Here the sibling writes in the model's own response format (the worked examples') and
its mistakes are those a model makes:

- ``carry``: a carry (or borrow) dropped or added in one calculation, the rest computed from it;
- ``operation``: the wrong operation (written with the question's operator in bare arithmetic,
  "37 * 6 = 43"; as the wrong operator, correctly computed, in a word problem, "64 + 21 = 85");
- ``copy``: a number copied from the question where a result belongs (the answer of a one-step
  problem, the left side of a second step);
- ``digits``: the digits of a result swapped ("72" written "27");
- ``label``: a classification's label flipped, its reasons kept.

Every slip changes the final answer, so the rule judge finds each wrong response wrong.
"""

from __future__ import annotations

import random
from dataclasses import replace

from nlft_kernels.recipes.tasks.base import Problem, Step

BARE_FAMILIES = ("add2", "mul21", "add3")
OTHER_OPERATION = {"+": "-", "-": "+", "*": "+"}


def solve(problem: Problem, rng: random.Random, accuracy: float) -> tuple[str, str | None]:
    """(response, slip kind or None): the reference solution with probability ``accuracy``,
    else the solution with one slip of a kind drawn with ``rng`` among those that change the
    answer of ``problem``."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    if rng.random() < accuracy:
        return problem.solution, None
    if problem.label is not None:
        return _flip_label(problem), "label"
    kinds = ["carry", "operation", "copy", "digits"]
    rng.shuffle(kinds)
    for kind in kinds:
        response = _slip(problem, kind, rng)
        if response is not None:
            return response, kind
    raise ValueError(f"no slip changes the answer of {problem.question!r}")


def _slip(problem: Problem, kind: str, rng: random.Random) -> str | None:
    """``problem``'s solution with one slip of ``kind``, or None when that kind cannot change
    its final answer (or would make it negative)."""
    steps = problem.steps
    answer: int | None = None
    if kind == "copy":
        first = steps[0]
        if len(steps) == 1:  # the answer states a number of the question instead of the result
            written, values = [first.text()], [first.value]
            answer = first.right if first.right != first.value else first.left
        else:  # the second step starts from a number of the question instead of the first result
            second = replace(steps[1], left=first.right)
            written, values = [first.text(), second.text()], [first.value, second.value]
    else:
        at = rng.randrange(len(steps))
        written, values = [], []
        for i, step in enumerate(steps):
            if i > 0:  # later steps compute from what was written before: a slip propagates
                step = replace(step, left=values[-1])
            value, text = step.value, step.text()
            if i == at:
                value, text = _slipped_step(problem, step, kind)
            written.append(text)
            values.append(value)
    final = values[-1] if answer is None else answer
    if final == steps[-1].value or final < 0 or min(values) < 0:
        return None
    return " ".join(f"{t}." for t in written) + f" The answer is {final}."


def _slipped_step(problem: Problem, step: Step, kind: str) -> tuple[int, str]:
    """(value, text) of ``step`` written with a slip of ``kind`` (carry, operation, digits)."""
    if kind == "carry":
        value = _carry_slip(step)
        return value, step.text(value)
    if kind == "operation":
        other = Step(step.left, OTHER_OPERATION[step.op], step.right)
        if problem.family in BARE_FAMILIES:  # the question's expression, the other operation's result
            value = abs(other.value)
            return value, step.text(value)
        return other.value, other.text()
    swapped = int(str(step.value)[::-1]) if step.value >= 10 else step.value
    return swapped, step.text(swapped)


def _carry_slip(step: Step) -> int:
    """The result of ``step`` with one carry (or borrow) mistaken: dropped where there is one,
    added where there is none (at the units)."""
    a, b = step.left, step.right
    if step.op == "+":
        position, carry = 0, 0
        while a or b:
            digit_sum = a % 10 + b % 10 + carry
            carry = digit_sum // 10
            if carry:
                return step.value - 10 ** (position + 1)  # the carry forgotten
            a, b, position = a // 10, b // 10, position + 1
        return step.value + 10  # a carry written where there is none
    if step.op == "-":
        return step.value + 10 if a % 10 < b % 10 else step.value - 10 if step.value >= 10 else step.value + 10
    carry = (a % 10) * b // 10
    return step.value - 10 * carry if carry else step.value + 10


def _flip_label(problem: Problem) -> str:
    """The solution with its reasons and the other label."""
    other = "negative" if problem.label == "positive" else "positive"
    return problem.solution.replace(f"The answer is {problem.label}.", f"The answer is {other}.")
