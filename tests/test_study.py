"""nlft_kernels.recipes.study, .diagnostics and .demo on a tiny random model: the arms' records,
the same initialisation and order in every arm, the diagnostics against the saliency details
they come from, and the demo's files."""

import json

import pytest
import torch

from nlft_kernels.config import NLFTConfig
from nlft_kernels.recipes import study as lib
from nlft_kernels.recipes.diagnostics import describe, record_diagnostics, summarize
from nlft_kernels.recipes.tasks import get_task
from tests._tiny import tiny_model, tiny_tokenizer

SEED = 20261126
# A judge view that marks tokens salient on a random model: every wrong token whose p_j beats
# p_b and p_s at all (the default thresholds need a model that reads the judgment).
EAGER = NLFTConfig(ratio_threshold=1.0, judge_min_prob=0.0)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_model(len(tokenizer), seed=1), tokenizer


def sibling(n: int, accuracy: float = 0.5, seed: int = SEED):
    task = get_task("add2")
    problems = task.problems("train", n, seed)
    return task, problems, lib.sibling_responses(task, problems, accuracy=accuracy, seed=seed)


def test_arm_records():
    task, problems, judged = sibling(12)
    wrong = [j for j in judged if not j.correct]
    assert wrong and len(wrong) < len(judged)  # both kinds: the arms differ
    nlft = lib.arm_records(task, problems, judged, "nlft")
    sft = lib.arm_records(task, problems, judged, "sft")
    assert [r.response for r in nlft] == [r.response for r in sft] == [j.response for j in judged]
    assert all(r.correct for r in sft) and [r.correct for r in nlft] == [j.correct for j in judged]
    assert all((r.judgment is None) == r.correct for r in nlft)
    for r, j in zip(nlft, judged, strict=True):
        p = problems[j.problem]
        assert r.question == task.prompt(p) and r.answer == p.solution and r.instruction == task.instruction
    assert [r.response for r in lib.arm_records(task, problems, judged, "sft_correct")] == [
        j.response for j in judged if j.correct
    ]
    assert [r.response for r in lib.arm_records(task, problems, judged, "sft_reference")] == [
        p.solution for p in problems
    ]
    with pytest.raises(ValueError, match="arm must be one of"):
        lib.arm_records(task, problems, judged, "ppo")


def test_sibling_responses_need_a_solver():
    with pytest.raises(ValueError, match="no sibling solver"):
        lib.sibling_responses(get_task("gsm8k"), [], accuracy=0.8, seed=0)


def test_arms_share_initialisation_and_batch_order(tiny):
    model, tokenizer = tiny
    task, problems, judged = sibling(6)
    settings = lib.FitSettings(steps=3, lr=1e-2, batch_size=2, seed=7)
    records = lib.arm_records(task, problems, judged, "sft")
    a, losses_a = lib.fit_arm(model, tokenizer, records, "sft", settings)
    b, losses_b = lib.fit_arm(model, tokenizer, records, "sft", settings)
    assert losses_a == losses_b  # the same adapter initialisation and batch order
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    moved = any(not torch.equal(x, y) for x, y in zip(a.parameters(), model.parameters(), strict=True))
    assert moved  # the merged adapter changed the weights
    _, other = lib.fit_arm(model, tokenizer, records, "sft", lib.FitSettings(steps=3, lr=1e-2, batch_size=2, seed=8))
    assert other != losses_a
    _, nlft = lib.fit_arm(model, tokenizer, lib.arm_records(task, problems, judged, "nlft"), "nlft", settings)
    assert len(nlft) == 3 and all(torch.isfinite(torch.tensor(nlft)))


def test_a_shared_prefix_generates_what_the_whole_prompt_does(tiny):
    from nlft_kernels.recipes.generation import GenerationSettings, generate_responses

    model, tokenizer = tiny
    model = tiny_model(len(tokenizer), seed=1).double()  # float64: no argmax tie flips between the two paths
    task = get_task("add2")
    problems = task.problems("test", 7, SEED) + get_task("word1").problems("test", 3, SEED)
    prompts = [task.prompt(p) if p.family == "add2" else get_task("word1").prompt(p) for p in problems]
    kwargs = dict(instruction=task.instruction, progress=False)
    alone = generate_responses(model, tokenizer, prompts, settings=GenerationSettings(12, batch_size=1), **kwargs)
    shared = generate_responses(  # alone: no padding, no sharing
        model, tokenizer, prompts, settings=GenerationSettings(12, batch_size=3), share_prefix=True, **kwargs
    )
    assert shared == alone and len(set(alone)) > 1


def test_evaluate_reads_judges_and_intervals(tiny):
    from scipy.stats import binomtest

    model, tokenizer = tiny
    task = get_task("add2")
    problems = task.problems("test", 5, 0)
    result = lib.evaluate(model, tokenizer, task, problems, batch_size=3)
    assert result.count == 5 and len(result.responses) == 5
    assert result.correct == [task.judge(p, r).correct for p, r in zip(problems, result.responses, strict=True)]
    ci = binomtest(sum(result.correct), 5).proportion_ci(method="wilson")
    assert result.ci95 == pytest.approx((ci.low, ci.high))
    assert all("\n\n" not in r for r in result.responses)  # read up to the first blank line
    assert lib.wilson_interval(3, 10) == pytest.approx(
        tuple(binomtest(3, 10).proportion_ci(method="wilson")[i] for i in (0, 1))
    )


def test_diagnostics_count_what_the_saliency_details_say(tiny):
    from nlft_kernels.saliency_map import saliency_details

    model, tokenizer = tiny
    task, problems, judged = sibling(10, accuracy=0.4, seed=3)
    rows = record_diagnostics(model, tokenizer, task, problems, judged, config=EAGER)
    details = saliency_details(model, tokenizer, lib.arm_records(task, problems, judged, "nlft"), config=EAGER)
    assert len(rows) == len(judged)
    for row, d, j in zip(rows, details, judged, strict=True):
        counts = d.counts()
        assert (row["tokens"], row["unlikelihood"], row["saliency"]) == (
            counts["tokens"], counts["unlikelihood"], counts["saliency"]
        )  # fmt: skip
        assert row["over_rule"] == (not j.correct and counts["saliency"] > 0.06 * counts["tokens"])
        if not j.correct:
            # The wrong tokens are those of the numbers the reference does not write there.
            spans = task.wrong_spans(problems[j.problem], j.response)
            assert spans and row["wrong_tokens"] >= len(spans)
            assert row["wrong_unlikelihood"] + len(row["wrong_likelihood_weights"]) == row["wrong_tokens"]
        else:
            assert row["wrong_tokens"] == 0
    wrong = [r for r in rows if not r["correct"]]
    assert any(r["unlikelihood"] for r in wrong) and any(r["over_rule"] for r in wrong)  # the marks are exercised
    s = summarize(rows)
    assert s["records"] == 10 and s["wrong_records"] == len(wrong) and s["correct_share"] == 1 - len(wrong) / 10
    assert s["unlikelihood_tokens_per_wrong_record"] == pytest.approx(
        sum(r["unlikelihood"] for r in wrong) / len(wrong)
    )
    likelihood = sum(r["likelihood_weight"] for r in wrong)
    total = likelihood + sum(r["unlikelihood_weight"] for r in wrong)
    assert s["wrong_records_likelihood_weight_share"] == pytest.approx(likelihood / total)
    assert s["records_over_saliency_rule"] == sum(r["over_rule"] for r in wrong)
    assert "records" in describe(s) and "6% rule" in describe(s)
    assert "all correct" in describe(summarize([r for r in rows if r["correct"]]))


def test_demo_writes_its_files_and_both_accuracies(tiny, tmp_path):
    from nlft_kernels.recipes.demo import DemoSettings, run_demo

    _, tokenizer = tiny
    settings = DemoSettings(train_size=6, test_size=4, steps=2, batch_size=2, generation_batch=4, seed=2)
    said = []
    result = run_demo(settings, model=tiny_model(len(tokenizer), seed=1), tokenizer=tokenizer, out=tmp_path,
                      progress=False, say=said.append)  # fmt: skip
    assert result.before.count == result.after.count == 4 and result.records == 6
    assert 0 <= result.before.ci95[0] <= result.before.accuracy <= result.before.ci95[1] <= 1
    for kind in ("html", "jsonl", "records", "summary"):
        assert result.files[kind].is_file(), kind
    assert len(result.files["jsonl"].read_text().splitlines()) == 6  # the map of the records trained on
    summary = json.loads(result.files["summary"].read_text())
    assert summary["before"]["per_question"] == result.before.correct and summary["settings"]["steps"] == 2
    assert said[-1] == result.summary() and "before" in said[-1] and "-> after" in said[-1]
    assert result.wrong_records == sum(
        not json.loads(x)["correct"] for x in result.files["records"].read_text().splitlines()
    )


def test_demo_on_gsm8k_trains_on_the_models_own_samples(tiny, tmp_path):
    """GSM8K has no sibling solver: the demo samples the model itself (--task gsm8k), and says so."""
    from nlft_kernels.recipes.demo import DemoSettings, run_demo

    _, tokenizer = tiny
    settings = DemoSettings(task="gsm8k", train_size=2, test_size=2, steps=1, batch_size=2, generation_batch=2,
                            max_new_tokens=4)  # fmt: skip
    assert settings.response_source == "own"
    result = run_demo(settings, model=tiny_model(len(tokenizer), seed=1), tokenizer=tokenizer, out=tmp_path,
                      progress=False, say=lambda line: None)  # fmt: skip
    assert result.records == 2 and result.after.count == 2
    summary = json.loads(result.files["summary"].read_text())
    assert summary["settings"]["source"] == "own" and "2 own responses" in summary["summary"]
    with pytest.raises(ValueError, match="no sibling solver"):
        DemoSettings(task="gsm8k", source="sibling")
