"""A rule-based judge for math word problems (GSM8K style), with no external API.

It answers the question NLFT needs for each model response: is it correct, and if not, what
is wrong with it, in natural language (the judge view's prompt quotes that judgment).

Final answer extraction, first rule that matches wins:

1. ``#### n`` (GSM8K's own marker), the last one in the text;
2. ``\\boxed{n}``, the last one;
3. an answer phrase ("the answer is n", "answer: n", "final answer = n"), the last one, and the
   first number after it;
4. otherwise the last number in the text (small models often end with a bare result).

Numbers may carry ``$``, ``%``, thousands commas, decimals and a sign (``-`` or ``−``); they
are compared as exact decimals after removing those, so ``$1,200.00`` equals ``1200``.

Step checking: every written equation is evaluated, including chains (``a + b + c = d``,
``a * b = c = d``), the operators ``+ - * / x × ÷`` (``x`` only between numbers), parentheses,
percentages and GSM8K's ``<<a*b=c>>`` calculator annotations. A result may be rounded to the
decimals it is written with (``10 / 3 = 3.33`` passes).

A response is correct when its final answer equals the reference answer and none of its
equations is wrong (a right answer reached through a wrong step is not a good training target).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, DivisionByZero, InvalidOperation, localcontext

from nlft_kernels.recipes.judgment import (
    SCORE_CORRECT,
    SCORE_NO_ANSWER,
    SCORE_WRONG_ANSWER,
    SCORE_WRONG_STEP,
    JudgeError,
    Judgment,
)

_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"
# A sign counts only when it touches the number: in "10 - 3" the last number is 3, not -3.
_SIGNED_NUMBER = re.compile(rf"(?<![\w.,)])([-−]?)\$?({_NUMBER})(%?)")
_FINAL_MARK = re.compile(r"####\s*([^\n]*)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_PHRASE = re.compile(r"(?:answer\s*(?:is|:|=|will be|would be)|answer\s+is\s*:)", re.IGNORECASE)
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
# Runs of characters an arithmetic statement is written with; words end a run.
_MATH_RUN = re.compile(r"[\d.,$%()+\-*/=\s]*=[\d.,$%()+\-*/=\s]*")
_TIMES_X = re.compile(r"(?<=[\d)%])\s*[xX]\s*(?=[\d($])")
# "28 / 1/5": a fraction written without spaces binds tighter than the operators around it.
_TOKEN = re.compile(rf"\s*(?:(\d+/\d+)(?![\d.,%/])|({_NUMBER})(%?)|([-+*/()]))")
# Words before a bare number that make it part of a computation the checker cannot read.
_ARITHMETIC_WORDS = re.compile(
    r"\b(?:of|times|by|per|than|half|twice|double|triple|each|every|and|x)\s*$", re.IGNORECASE
)


@dataclass(frozen=True)
class StepError:
    """One written equation whose arithmetic is wrong: ``text`` as written, ``expected`` its value."""

    text: str
    expression: str
    written: Decimal
    expected: Decimal
    line: int


# ---------------------------------------------------------------- numbers and final answers


def parse_number(text: str) -> Decimal | None:
    """The first number in ``text`` (``$``, ``%``, commas and sign handled), or None."""
    match = _SIGNED_NUMBER.search(text)
    if match is None:
        return None
    sign, digits, _ = match.groups()
    value = Decimal(digits.replace(",", ""))
    return -value if sign else value


def extract_answer(text: str | None) -> Decimal | None:
    """The final answer of a solution or response, by the rules in the module docstring."""
    if not text:
        return None
    for pattern in (_FINAL_MARK, _BOXED):
        matches = list(pattern.finditer(text))
        if matches:
            value = parse_number(matches[-1].group(1))
            if value is not None:
                return value
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        value = parse_number(text[phrases[-1].end() :])
        if value is not None:
            return value
    numbers = list(_SIGNED_NUMBER.finditer(_ANNOTATION.sub("", text)))
    if not numbers:
        return None
    return parse_number(numbers[-1].group(0))


def answers_equal(predicted: Decimal | None, reference: Decimal | None) -> bool:
    """Exact decimal equality (``18.00 == 18``); False when either is missing."""
    if predicted is None or reference is None:
        return False
    return predicted == reference


def format_number(value: Decimal) -> str:
    """A number as a person writes it: no exponent, no trailing zeros after the point."""
    text = format(value.normalize(), "f") if value == value.to_integral_value() else format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text if text not in ("-0", "") else "0"


# ---------------------------------------------------------------- arithmetic of written steps


def _tokens(expression: str) -> list[tuple[str, Decimal | None]] | None:
    """Numbers (percent applied) and operators of ``expression``, or None if it has other text."""
    tokens: list[tuple[str, Decimal | None]] = []
    position, text = 0, expression.replace("$", "").rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            return None
        fraction, number, percent, operator = match.groups()
        if fraction is not None:
            numerator, denominator = fraction.split("/")
            tokens += [("(", None), ("num", Decimal(numerator)), ("/", None)]
            tokens += [("num", Decimal(denominator)), (")", None)]
        elif number is not None:
            value = Decimal(number.replace(",", ""))
            tokens.append(("num", value / 100 if percent else value))
        else:
            tokens.append((operator, None))
        position = match.end()
    return tokens


def evaluate(expression: str) -> Decimal | None:
    """The value of an arithmetic expression (+ - * / parentheses, unary minus), or None when it
    is not one. A small recursive-descent parser: no ``eval``."""
    tokens = _tokens(expression)
    if not tokens:
        return None
    position = 0

    def peek() -> str | None:
        return tokens[position][0] if position < len(tokens) else None

    def take() -> tuple[str, Decimal | None]:
        nonlocal position
        position += 1
        return tokens[position - 1]

    def atom() -> Decimal:
        kind = peek()
        if kind == "num":
            return take()[1]
        if kind == "-":
            take()
            return -atom()
        if kind == "(":
            take()
            value = expr()
            if peek() != ")":
                raise ValueError("unbalanced parenthesis")
            take()
            return value
        raise ValueError(f"unexpected {kind}")

    def term() -> Decimal:
        value = atom()
        while peek() in ("*", "/"):
            operator = take()[0]
            right = atom()
            value = value * right if operator == "*" else value / right
        return value

    def expr() -> Decimal:
        value = term()
        while peek() in ("+", "-"):
            operator = take()[0]
            right = term()
            value = value + right if operator == "+" else value - right
        return value

    with localcontext() as context:
        context.prec = 40
        try:
            value = expr()
        except (ValueError, ArithmeticError, DivisionByZero, InvalidOperation):
            return None
    return value if position == len(tokens) else None


def _has_operator(expression: str) -> bool:
    tokens = _tokens(expression) or []
    return any(kind in "+-*/" for kind, _ in tokens[1:]) or (len(tokens) > 1 and tokens[0][0] == "(")


def _decimals(written: str) -> int:
    match = re.search(r"\.(\d+)", written)
    return len(match.group(1)) if match else 0


def _close(expected: Decimal, written: Decimal, written_text: str, percent: bool = False) -> bool:
    """Equal up to the rounding of the written value (to the decimals it shows), or its
    truncation to a whole number ("100 / 6 = 16" full boxes). With a percentage on either side,
    "%" may be a unit ("100 - 50 = 50%", "100% - 80% = 20") as well as a fraction ("0.5 = 50%")."""
    tolerance = Decimal(5) / Decimal(10) ** (_decimals(written_text) + 1)
    candidates = [expected]
    if percent:
        candidates += [expected * 100, expected / 100]
    for value in candidates:
        if abs(value - written) <= max(tolerance, abs(value) * Decimal("1e-9")):
            return True
        if _decimals(written_text) == 0 and written in (
            value.to_integral_value("ROUND_FLOOR"),
            value.to_integral_value("ROUND_CEILING"),
        ):
            return True
    return False


def _normalise(text: str) -> str:
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-").replace("–", "-")
    text = re.sub(r"\\times|\\cdot", "*", text)
    text = text.replace("\\div", "/")
    text = text.replace("**", " ").replace("__", " ")  # markdown bold, never a power in these texts
    return _TIMES_X.sub(" * ", text)


def _trim_left(expression: str) -> str | None:
    """The longest suffix of ``expression`` that is a well-formed expression with a number."""
    # A candidate starts at a number, "(", "$" or a sign that touches its number ("-3", not "- 3").
    tokens = list(re.finditer(rf"{_NUMBER}|[($]|-(?=[\d.$])", expression))
    for match in tokens:
        candidate = expression[match.start() :]
        if evaluate(candidate) is not None:
            return candidate
    return None


def _trim_right(expression: str) -> str | None:
    """The longest prefix of ``expression`` that evaluates (drops a sentence's full stop)."""
    for end in range(len(expression), 0, -1):
        candidate = expression[:end]
        if candidate.strip() and evaluate(candidate) is not None:
            return candidate
    return None


def _check_chain(
    parts: list[str], line: int, preceded_by_word: bool, glued_after: bool, glued_before: bool = False
) -> list[StepError]:
    """Check ``parts[0] = parts[1] = ...`` pairwise; parts[0] and parts[-1] are trimmed first.

    A side that had to be cut out of its text is part of an expression the checker cannot read
    ("S + 143", "86(2)", "4 ft * 3", "5A"), so the pair it belongs to is skipped.
    """
    parts = list(parts)
    first = _trim_left(parts[0])
    last = _trim_right(parts[-1])
    if first is None or last is None:
        return []
    first_cut = glued_before or bool(re.search(r"[\d()+\-*/$%]", parts[0][: len(parts[0]) - len(first)]))
    last_cut = glued_after or bool(re.search(r"[\d()+\-*/$]", parts[-1][len(last) :]))
    parts[0], parts[-1] = first, last
    errors = []
    for index, (left, right) in enumerate(zip(parts, parts[1:], strict=False)):
        if evaluate(left) is None or evaluate(right) is None:
            break
        if index == 0 and (preceded_by_word or first_cut or not _has_operator(left)):
            # "half of 10 = 5", "Remaining 10 = 62,300/10": the words carry part of the computation.
            continue
        if index == len(parts) - 2 and last_cut:
            continue
        # The value that is "written" is the simpler side: usually the right one.
        expression, result = (left, right) if _has_operator(left) or not _has_operator(right) else (right, left)
        expected, written = evaluate(expression), evaluate(result)
        if not _close(expected, written, result, percent="%" in left + right):
            errors.append(StepError(f"{left.strip()} = {right.strip()}", expression.strip(), written, expected, line))
    return errors


def find_step_errors(text: str) -> list[StepError]:
    """Every written equation (and calculator annotation) of ``text`` whose arithmetic is wrong."""
    errors: list[StepError] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        for annotation in _ANNOTATION.finditer(line):
            parts = _normalise(annotation.group(1)).split("=")
            if len(parts) >= 2:
                errors += _check_chain(parts, line_number, preceded_by_word=False, glued_after=False)
        line = _normalise(_ANNOTATION.sub("", line))
        # Sentences and list items end a statement: "2 + 2 = 4. 4 * 3 = 12" is two of them.
        line = re.sub(r"[.,;](?=\s|$)", " ; ", line)
        for run in _MATH_RUN.finditer(line):
            parts = run.group(0).split("=")
            before = line[: run.start()]
            preceded_by_word = bool(_ARITHMETIC_WORDS.search(before))
            # "= 5A", "= 6:48": the run ends inside a name or a time.
            after, text = line[run.end() : run.end() + 1], run.group(0)
            glued_after = bool(after) and not text[-1].isspace() and after not in "!?;\"'"
            glued_after = glued_after or bool(re.match(r"\s*and\s+\d+/\d+", line[run.end() :]))  # 5 and 2/3
            # "D3 = ...", "√(144) = 12", "6:00+48": the run starts inside a name, function or time.
            glued_before = bool(before) and not text[0].isspace() and before[-1] not in "\"'[{"
            errors += _check_chain(parts, line_number, preceded_by_word, glued_after, glued_before)
    return errors


# ---------------------------------------------------------------- the judgment


def _reference_steps(reference_solution: str) -> list[tuple[str, Decimal]]:
    """(equation as written, its result) for each step of the reference solution."""
    steps = []
    for annotation in _ANNOTATION.finditer(reference_solution):
        expression, _, result = annotation.group(1).rpartition("=")
        value = evaluate(_normalise(result))
        if expression and value is not None:
            steps.append((f"{expression.strip()} = {result.strip()}", value))
    if steps:
        return steps
    # Sentences end a statement, as in find_step_errors: "2 + 3 = 5. 5 * 4 = 20." is two steps.
    clean = re.sub(r"[.,;](?=\s|$)", " ; ", _normalise(reference_solution))
    for run in _MATH_RUN.finditer(clean):
        parts = run.group(0).split("=")
        first, last = _trim_left(parts[0]), _trim_right(parts[-1])
        if first and last and _has_operator(first) and evaluate(last) is not None:
            steps.append((f"{first.strip()} = {last.strip()}", evaluate(last)))
    return steps


def _numbers_in(text: str) -> set[Decimal]:
    values = set()
    for match in _SIGNED_NUMBER.finditer(_normalise(text)):
        values.add(Decimal(match.group(2).replace(",", "")))
    return values


def judge_response(question: str, response: str, reference_solution: str) -> Judgment:
    """Judge ``response`` against ``reference_solution`` (GSM8K style, ending in ``#### n``).

    Returns ``Judgment(correct, judgment, score)``; ``judgment`` names, in sentences, the first
    wrong step and why, whether the final answer is wrong or missing, where the response leaves
    the reference solution, and the reference answer. It is None for a correct response.
    """
    reference = extract_answer(reference_solution)
    if reference is None:
        raise ValueError(f"the reference solution has no final answer: {reference_solution[-80:]!r}")
    predicted = extract_answer(response)
    step_errors = find_step_errors(response)
    answer_right = answers_equal(predicted, reference)
    if answer_right and not step_errors:
        return Judgment(True, None, SCORE_CORRECT)

    sentences = []
    if step_errors:
        error = step_errors[0]
        sentences.append(
            f'The step "{error.text}" (line {error.line}) is wrong: {error.expression} equals '
            f"{format_number(error.expected)}, not {format_number(error.written)}."
        )
        if len(step_errors) > 1:
            more = len(step_errors) - 1
            sentences.append(
                f"There {'is' if more == 1 else 'are'} {more} more arithmetic mistake{'s' * (more > 1)} after it."
            )
    if predicted is None:
        sentences.append("The response does not state a final answer.")
        score = SCORE_NO_ANSWER
    elif answer_right:
        sentences.append(
            f"The final answer {format_number(predicted)} is right, but it is not supported by correct arithmetic."
        )
        score = SCORE_WRONG_STEP
    else:
        sentences.append(f"The final answer {format_number(predicted)} is wrong.")
        score = SCORE_WRONG_ANSWER
    if not answer_right:
        missed = _first_missed_step(response, reference_solution)
        if missed is not None:
            sentences.append(
                f"The response never finds the value {format_number(missed[1])}, which the reference solution "
                f"gets from {missed[0]}."
            )
    sentences.append(f"The correct answer is {format_number(reference)}.")
    return Judgment(False, " ".join(sentences), score)


def _first_missed_step(response: str, reference_solution: str) -> tuple[str, Decimal] | None:
    """The first step of the reference whose result the response never writes."""
    written = _numbers_in(_ANNOTATION.sub(" ", response))
    for equation, value in _reference_steps(reference_solution):
        if value not in written and -value not in written:
            return equation, value
    return None


def rule_judge(question: str, response: str, reference_solution: str) -> Judgment:
    """:func:`judge_response` behind :class:`~nlft_kernels.recipes.judgment.Judge`: a reference
    without a final answer is a :class:`~nlft_kernels.recipes.judgment.JudgeError` on that record only."""
    try:
        return judge_response(question, response, reference_solution)
    except ValueError as err:
        raise JudgeError(str(err)) from err


rule_judge.name = "rule"
