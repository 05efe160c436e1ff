"""The judge prompt and the tolerant reading of a judge model's reply (nlft_kernels.recipes.judge_prompt)."""

from __future__ import annotations

import pytest

from nlft_kernels.recipes.judge_prompt import judge_messages, judgment_text, parse_verdict
from nlft_kernels.recipes.judgment import JudgeError
from tests._judge_server import REPLY_RIGHT, REPLY_WRONG


@pytest.mark.parametrize(
    "reply, correct, judgment",
    [
        (REPLY_RIGHT, True, None),
        (REPLY_WRONG, False, "The step 16 - 3 = 12 is wrong: 16 - 3 is 13. The correct answer is 18."),
        ("Judgment: Forgot the 4 muffin eggs.\n\n**Verdict:** Incorrect", False, "Forgot the 4 muffin eggs."),
        ("The response is correct.\n\n**Final Verdict**: **Correct**", True, None),
        ("Off by one.\nverdict - WRONG.", False, "Off by one."),
        ("It adds instead of subtracting. Rating: [[wrong]]", False, "It adds instead of subtracting."),
        ("### The response is correct. ###", True, None),  # the authors' judge's sentence
        ('{"judgment": "Wrong total.", "correct": false}', False, "Wrong total."),
        ('```json\n{"correct": true, "judgment": ""}\n```', True, None),
        ('Sure! {"verdict": "incorrect", "explanation": "Missed a step."}', False, "Missed a step."),
        ("The final sum is wrong.\nScore: 3/10", False, "The final sum is wrong."),
        ("All steps check out.\nScore: 9", True, None),
        ("It is not correct: 12 should be 13.\nVerdict: not correct", False, "It is not correct: 12 should be 13."),
        ("Every step checks out.\nVerdict: The response is correct.", True, None),
        ("It drops the 4 eggs.\nFinal verdict: the student's response is wrong", False, "It drops the 4 eggs."),
    ],
)
def test_parse_verdict(reply, correct, judgment):
    result = parse_verdict(reply)
    assert (result.correct, result.judgment) == (correct, judgment)
    assert result.raw == reply


@pytest.mark.parametrize(
    "reply, message",
    [
        ("", "empty"),
        ("I like turtles.", "no verdict"),
        ("<html>502 Bad Gateway</html>", "no verdict"),
        ("Verdict: wrong", "no judgment"),
        ('{"correct": false, "judgment": ""}', "no judgment"),
        ('{"judgment": "hmm"}', "no verdict"),
        ("Verdict: no errors found", "no verdict"),  # neither word: not guessed
        # the authors' sentence next to a word of blame is no verdict
        ("The response is correct in its setup, but 9*2=16 is wrong; the final answer is incorrect.", "no verdict"),
        ("The response is correct up to step 2, then it makes a mistake.", "no verdict"),
    ],
)
def test_parse_verdict_rejects(reply, message):
    with pytest.raises(JudgeError, match=message) as info:
        parse_verdict(reply)
    assert info.value.raw == reply


@pytest.mark.parametrize(
    "reply, text",
    [
        ('{"judgment": "The answer is 999.", "correct": true}', "The answer is 999."),  # a right verdict's text too
        ('{"judgment": "Wrong total.", "correct": false}', "Wrong total."),
        ("Judgment: Forgot the 4 muffin eggs.\n\n**Verdict:** Incorrect", "Forgot the 4 muffin eggs."),
        ("I like turtles.", "I like turtles."),  # no verdict: the text is still the model's
        ("Verdict: wrong", None),
        ('{"correct": false, "judgment": ""}', None),
        ("", None),
        (None, None),
    ],
)
def test_judgment_text_whatever_the_verdict(reply, text):
    assert judgment_text(reply) == text


def test_prompt_has_question_reference_and_response():
    system, user = judge_messages("Q?", "my answer", "#### 5")
    assert "math expert" in system["content"] and "Verdict: correct" in system["content"]
    assert "### Question:\nQ?" in user["content"] and "#### 5" in user["content"] and "my answer" in user["content"]
    assert "JSON" in judge_messages("Q?", "r", "a", json_reply=True)[0]["content"]
