"""nlft_kernels.recipes.tasks: pools disjoint by construction, references the judge accepts, the
sibling solver's error rate and slips, the answer reader, the classification judge."""

import random
from collections import Counter

import pytest

from nlft_kernels.recipes.rule_judge import find_step_errors
from nlft_kernels.recipes.tasks import FAMILIES, SPLITS, before_blank_line, get_task, split_of, task_names
from nlft_kernels.recipes.tasks.sentiment import read_label

SEED = 20261126
GENERATED = [name for name in task_names() if name != "gsm8k"]


def identity(task_name: str, problem) -> tuple:
    """What decides a problem's split (the sorted operands of an addition)."""
    if problem.family in FAMILIES:
        return (problem.family, FAMILIES[problem.family].space.identity(problem.key))
    return (problem.family, problem.key)


@pytest.mark.parametrize("name", GENERATED)
def test_pools_are_disjoint_across_splits_and_seeds(name):
    task = get_task(name)
    seen: dict[tuple, str] = {}
    for split in SPLITS:
        for seed in (0, 1, SEED):
            problems = task.problems(split, 120 if split != "validation" else 40, seed)
            assert len({p.key for p in problems}) == len(problems)  # no problem twice in one draw
            for p in problems:
                assert p.split == split
                assert seen.setdefault(identity(name, p), split) == split, f"{p.question!r} in two splits"
    # The worked examples of the prompt are never asked.
    examples = task.prompt(task.problems("test", 1, 0)[0]).split("\n\n")[:-1]
    asked = {p.question for s in SPLITS for p in task.problems(s, 40, 3)}
    assert examples and not any(e.splitlines()[0].removeprefix("Q: ") in asked for e in examples)


def test_a_small_family_is_partitioned_exactly():
    # mul21 has 720 problems: each in one pool, the pools about 50 / 10 / 40 percent of them.
    space = FAMILIES["mul21"].space
    keys = {space.key_at(i) for i in range(space.size)}
    counts = Counter(split_of("mul21", k) for k in keys)
    assert sum(counts.values()) == 720 and set(counts) == set(SPLITS)
    assert 0.42 < counts["train"] / 720 < 0.58 and counts["test"] >= 250
    pool = counts["test"] - len([k for k in FAMILIES["mul21"].examples if split_of("mul21", k) == "test"])
    assert len(get_task("mul21").problems("test", pool, 0)) == pool
    with pytest.raises(ValueError, match="the pool has"):
        get_task("mul21").problems("test", pool + 1, 0)


def test_draws_are_reproducible_and_seeded():
    task = get_task("arithmetic")
    a, b, c = (task.problems("train", 30, s) for s in (5, 5, 6))
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in a] != [p.question for p in c]
    assert Counter(p.family for p in a) == Counter({f: 6 for f in FAMILIES})  # equal shares


@pytest.mark.parametrize("name", GENERATED)
def test_references_are_verified_by_the_judge(name):
    task = get_task(name)
    for p in task.problems("test", 60, SEED):
        response = task.reference_response(p)
        assert task.judge(p, response).correct, (p.question, response)
        assert task.judge_row(task.prompt(p), response, p.solution).correct
        assert not find_step_errors(response)
        assert task.read(response + "\n\nQ: What is 1 + 1?\nA: 1 + 1 = 2.") == response
        if p.steps:  # the answer is the last step's value, each step computed from the one before
            assert p.answer == str(p.steps[-1].value) and response.endswith(f"The answer is {p.answer}.")
            for before, after in zip(p.steps, p.steps[1:], strict=False):
                assert after.left == before.value


def test_gsm8k_is_a_task_with_disjoint_train_and_validation():
    rows = {"train": [{"question": f"Q{i}?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(300)]}
    rows["test"] = [{"question": "T?", "answer": "2 * 3 = <<2*3=6>>6\n#### 6"}]
    from nlft_kernels.recipes.tasks import GSM8KTask

    task = GSM8KTask(rows)
    train = {p.question for p in task.problems("train", 200, 0)}
    validation = {p.question for p in task.problems("validation", 15, 0)}
    assert not train & validation
    (test,) = task.problems("test", 1, 0)
    assert test.answer == "6" and task.reference_response(test) == "2 * 3 = 6\nThe answer is 6."
    assert task.judge(test, task.reference_response(test)).correct and not task.has_solver
    assert get_task("gsm8k").instruction.startswith("Solve the math problem")


@pytest.mark.parametrize("name", ["add2", "mul21", "word1", "word2", "arithmetic", "sentiment"])
def test_sibling_error_rate_is_within_its_binomial_interval(name):
    from scipy.stats import binomtest

    task = get_task(name)
    problems = task.problems("train", 300, SEED)  # mul21's train pool has 379
    rng = random.Random(SEED)
    accuracy = 0.8
    slips = Counter()
    wrong = 0
    for p in problems:
        response, slip = task.solve(p, rng, accuracy)
        verdict = task.judge(p, response)
        # A slip is always judged wrong (with a judgment), a clean response always right.
        assert verdict.correct == (slip is None), (p.question, response, slip)
        assert slip is None or verdict.judgment
        if slip is not None:
            wrong += 1
            slips[slip] += 1
            assert task.wrong_spans(p, response), (response, p.solution)  # the slip is located
    interval = binomtest(wrong, len(problems)).proportion_ci(confidence_level=0.999)
    print(f"seed {SEED}: {wrong} wrong of {len(problems)}, 99.9% interval {interval}")
    assert interval.low <= 1 - accuracy <= interval.high
    kinds = {"label"} if name == "sentiment" else {"carry", "operation", "copy", "digits"}
    assert set(slips) == kinds, slips  # every kind of slip occurs


def test_slips_read_as_a_model_writes_them():
    task = get_task("word2")
    # a + b - c with b > c: every kind of slip can change its answer (copying b gives b - c > 0).
    (p,) = [q for q in task.problems("train", 200, 1) if q.key[0] == ("+", "-") and q.key[2] > q.key[3] + 10][:1]
    rng = random.Random(0)
    seen = {}
    for _ in range(200):
        response, slip = task.solve(p, rng, 0.0)
        seen[slip] = response
    assert {"copy", "operation", "carry"} <= set(seen), seen
    a, b, c = p.key[1:]
    first = a + b
    assert seen["copy"].startswith(f"{a} + {b} = {first}. {b} - {c} = ")  # a number of the question reused
    assert f"{a} - {b}" in seen["operation"] or f"{first} + {c}" in seen["operation"]
    for response in seen.values():
        assert response.endswith(".") and response.count("The answer is") == 1
    # A wrong two-step response's judgment names the reference's step with the value it misses.
    judgment = task.judge(p, seen["copy"]).judgment
    assert f"The correct answer is {first - c}." in judgment
    assert f"gets from {first} - {c} = {first - c}" in judgment or f"gets from {a} + {b} = {first}" in judgment


def test_wrong_spans_point_at_the_wrong_numbers():
    task = get_task("add2")
    (p,) = task.problems("test", 1, 4)
    a, b = p.key
    wrong = f"{a} + {b} = {a + b + 10}. The answer is {a + b + 10}."
    spans = [wrong[s:e] for s, e in task.wrong_spans(p, wrong)]
    assert spans == [str(a + b + 10)] * 2
    assert task.wrong_spans(p, p.solution) == []
    copied = f"{a} + {b} = {a + b}. The answer is {b}."
    assert [copied[s:e] for s, e in task.wrong_spans(p, copied)] == [str(b)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("27 + 45 = 72. The answer is 72.\n\nQ: What is 1 + 2?", "27 + 45 = 72. The answer is 72."),
        ("A: 27 + 45 = 72. The answer is 72.", "27 + 45 = 72. The answer is 72."),
        ("  27 + 45 = 72.\nThe answer is 72.\n \nmore", "27 + 45 = 72.\nThe answer is 72."),
        ("27 + 45 = 72. The answer is 72.\nQ: What is 3 + 4?\nA: 7", "27 + 45 = 72. The answer is 72."),
        ("\n\n27 + 45 = 72.", "27 + 45 = 72."),
        ("", ""),
    ],
)
def test_the_reader_keeps_the_text_before_the_first_blank_line(text, expected):
    assert before_blank_line(text) == expected


def test_sentiment_judge_reads_the_label_and_quotes_the_cues():
    task = get_task("sentiment")
    problems = task.problems("test", 40, SEED)
    labels = Counter(p.label for p in problems)
    assert set(labels) == {"positive", "negative"}
    p = problems[0]
    other = "negative" if p.label == "positive" else "positive"
    verdict = task.judge(p, f"The answer is {other}.")
    assert not verdict.correct and all(f'"{cue}"' in verdict.judgment for cue in p.cues)
    assert f"says the review is {other}, but it is {p.label}" in verdict.judgment
    assert not task.judge(p, "I cannot tell.").correct
    assert "does not say" in task.judge(p, "I cannot tell.").judgment
    assert task.judge(p, f"It is {p.label}.").correct
    assert read_label("Positive words, but the answer is: negative") == "negative"
    # On a row's texts (as `nlft judge` reads them) the verdict and judgment are the same.
    assert task.judge_row(task.prompt(p), f"The answer is {other}.", p.solution) == verdict
    with pytest.raises(ValueError, match="not a reference solution"):
        task.judge_row("q", "r", "#### 5")


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="add2, mul21"):
        get_task("mnist")
