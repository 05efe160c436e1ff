"""The judge prompt an LLM judge is given and the reading of its reply.

:func:`judge_messages` asks for a verdict and a judgment with the paper's judge prompt
(:data:`JUDGE_SYSTEM_PROMPT`, after the authors' ``sys2``), as free text ending in a verdict line or
as a JSON object (:data:`VERDICT_SCHEMA`, for servers that constrain decoding to it).
:func:`parse_verdict` reads a reply into a :class:`~nlft_kernels.recipes.judgment.Judgment` and
tolerates the formatting noise of real models (Markdown, fences, synonyms, scores); what it cannot
read is a :class:`~nlft_kernels.recipes.judgment.JudgeError` carrying the reply.
"""

from __future__ import annotations

import json
import re

from nlft_kernels.recipes.judgment import SCORE_CORRECT, SCORE_WRONG_ANSWER, JudgeError, Judgment

# The authors' scores: a response scored >= 7 of 10 is correct (see training.data.CORRECT_SCORE).
CORRECT_SCORE_OF_10 = 7


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


def _free_text(reply: str) -> str | None:
    """A free-text reply without its verdict, score and label lines (None if nothing is left)."""
    text = _SCORE_LINE.sub("", _BRACKETED.sub("", _VERDICT_LINE.sub("", reply)))
    return "\n".join(_LABEL.sub("", line) for line in text.strip().splitlines()).strip() or None


def judgment_text(reply: str | None) -> str | None:
    """The judgment a judge model wrote in ``reply``, whatever its verdict: a JSON reply's
    ``judgment`` (or ``analysis``, ``explanation``...) field, otherwise the reply without its
    verdict and score lines; None when the reply holds no text. For a judge view written by a
    model even where the model's verdict is not the one used (the study's LLM-judge arm)."""
    if not isinstance(reply, str) or not reply.strip():
        return None
    parsed = _from_json(reply)
    text = parsed[1] if parsed is not None else _free_text(reply)
    return text.strip() if text and text.strip() else None


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
        judgment = _free_text(reply)
    if correct:
        return Judgment(True, None, SCORE_CORRECT, raw=reply)
    if not judgment or not judgment.strip():
        raise JudgeError("the judge says wrong but gives no judgment of the errors", raw=reply)
    return Judgment(False, judgment.strip(), SCORE_WRONG_ANSWER if score is None else score / 10, raw=reply)
