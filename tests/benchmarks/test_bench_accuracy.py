"""benchmarks/bench_accuracy.py: its statistics against scipy and statsmodels computed here, and a
whole tiny study (tiny random Llama, a generated task) with its JSON layout and resume."""

import json
import math
import random

import numpy as np
import pytest

from benchmarks import accuracy_stats as stats
from benchmarks import bench_accuracy as ba
from tests._tiny import save_tiny_model

SEED = 20261126


def random_answers(rng: random.Random, n: int, p: float, like: list[bool] | None = None, keep: float = 0.0):
    """n right/wrong answers with P(right) = p; with ``like``, each copies it with probability ``keep``
    (answers of two arms on the same questions are correlated)."""
    return [like[i] if like and rng.random() < keep else rng.random() < p for i in range(n)]


def test_mcnemar_matches_the_exact_binomial_test():
    from scipy.stats import binomtest

    rng = random.Random(SEED)
    print("seed", SEED)
    for _ in range(20):
        n = rng.randint(5, 80)
        a = random_answers(rng, n, 0.4)
        b = random_answers(rng, n, 0.5, a, 0.5)
        table = stats.paired_table(a, b)
        only_a, only_b = table[0][1], table[1][0]
        assert sum(map(sum, table)) == n and only_a == sum(x and not y for x, y in zip(a, b, strict=True))
        expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert stats.mcnemar_p(table) == pytest.approx(expected, rel=1e-12)


def test_paired_interval_is_scipys_bootstrap():
    from scipy.stats import bootstrap

    rng = random.Random(SEED)
    a = random_answers(rng, 300, 0.35)
    b = random_answers(rng, 300, 0.45, a, 0.6)
    low, high = stats.paired_interval(a, b, resamples=2000, seed=3)
    ref = bootstrap(
        (np.asarray(a, float), np.asarray(b, float)), lambda u, v, axis: v.mean(axis) - u.mean(axis),
        paired=True, vectorized=True, n_resamples=2000, method="percentile", rng=np.random.default_rng(3),
    ).confidence_interval  # fmt: skip
    assert (low, high) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert low < (sum(b) - sum(a)) / 300 < high
    assert stats.paired_interval(a, a, resamples=100, seed=0) == (0.0, 0.0)


def test_two_level_bootstrap():
    rng = np.random.default_rng(SEED)
    print("seed", SEED)
    one = rng.choice([-1, 0, 0, 1], size=400, p=[0.1, 0.6, 0.1, 0.2])
    # Identical seeds: resampling seeds changes nothing, so it is the one-level question bootstrap
    # (scipy's, to its Monte Carlo error).
    from scipy.stats import bootstrap

    ref = bootstrap((one.astype(float),), np.mean, n_resamples=20000, method="percentile", rng=rng).confidence_interval
    same = stats.two_level_interval(np.stack([one, one, one]), resamples=20000, seed=1)
    assert same == pytest.approx((ref.low, ref.high), abs=0.006)
    # Seeds that disagree: the seed level widens the interval beyond the questions' alone.
    shifted = np.stack([one, np.where(rng.random(400) < 0.3, 1, one), np.where(rng.random(400) < 0.3, -1, one)])
    wide = stats.two_level_interval(shifted, resamples=20000, seed=1)
    pooled = bootstrap((shifted.mean(0),), np.mean, n_resamples=20000, method="percentile", rng=rng)
    assert wide[1] - wide[0] > 1.2 * (pooled.confidence_interval.high - pooled.confidence_interval.low)
    assert wide[0] < shifted.mean() < wide[1]


def synthetic_runs(settings, rng: random.Random) -> dict:
    runs = {"base": {"accuracy": 0.3, "per_question": random_answers(rng, settings.test_size, 0.3)}}
    for n in settings.n:
        for s in settings.seeds:
            sft = random_answers(rng, settings.test_size, 0.35, runs["base"]["per_question"], 0.5)
            nlft = random_answers(rng, settings.test_size, 0.35 + n / 1000, sft, 0.5)
            for arm, answers in (("sft", sft), ("nlft", nlft)):
                runs[ba.run_key(arm, n, s)] = {"accuracy": sum(answers) / len(answers), "per_question": answers}
    return runs


def test_comparisons_against_statsmodels():
    from statsmodels.stats.contingency_tables import mcnemar
    from statsmodels.stats.multitest import multipletests

    settings = ba.StudySettings(n=(25, 50, 100), seeds=(0, 1, 2), arms=("sft", "nlft"), bootstrap_resamples=2000)
    runs = synthetic_runs(settings, random.Random(SEED))
    rows = stats.comparison_rows(runs, settings)
    assert {(r["n"], r["comparison"]) for r in rows} == {
        (n, c) for n in settings.n for c in ("nlft - sft", "sft - base", "nlft - base")
    }
    main = [r for r in rows if r["comparison"] == "nlft - sft"]
    for r in main:
        keys = [(ba.run_key("sft", r["n"], s), ba.run_key("nlft", r["n"], s)) for s in settings.seeds]
        diffs = [runs[b]["accuracy"] - runs[a]["accuracy"] for a, b in keys]
        assert r["seed_differences"] == pytest.approx(diffs) and r["difference"] == pytest.approx(np.mean(diffs))
        summed = np.zeros((2, 2), int)
        for (a, b), p in zip(keys, r["mcnemar_p"], strict=True):
            x, y = np.asarray(runs[a]["per_question"]), np.asarray(runs[b]["per_question"])
            table = [[(x & y).sum(), (x & ~y).sum()], [(~x & y).sum(), (~x & ~y).sum()]]
            summed += np.asarray(table)
            assert p == pytest.approx(mcnemar(table, exact=True).pvalue)
        assert r["p"] == pytest.approx(mcnemar(summed, exact=True).pvalue)
        assert r["discordant"] == {"only_b": summed[1][0], "only_a": summed[0][1]}
        assert r["ci95"][0] <= r["difference"] <= r["ci95"][1]
    holm = multipletests([r["p"] for r in main], method="holm")[1]
    assert [r["p_holm"] for r in main] == pytest.approx(list(holm))
    assert len({r["p"] for r in main}) == 3  # distinct p-values: the correction is exercised


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("accuracy") / "model")


def test_tiny_study_end_to_end_and_resume(tiny_model_dir, tmp_path):
    from nlft_kernels.recipes.tasks import get_task

    out = tmp_path / "accuracy_tiny.json"
    argv = ["--preset", "tiny", "--model", str(tiny_model_dir), "--out", str(out), "--no-progress"]
    payload = ba.main(argv)
    s = ba.PRESETS["tiny"]
    saved = json.loads(out.read_text())
    assert payload["complete"] and saved["complete"] and saved["task"] == "add2"
    assert saved["settings"]["seeds"] == list(s.seeds) and saved["settings"]["test_size"] == s.test_size
    runs = saved["runs"]
    assert 0.0 <= runs["base"]["accuracy"] <= 1.0 and len(runs["base"]["per_question"]) == s.test_size
    assert set(runs) == {"base"} | {ba.run_key(a, n, seed) for a in s.arms for n in s.n for seed in s.seeds}
    for key, row in runs.items():
        assert len(row["per_question"]) == row["count"] == s.test_size
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
        if key != "base":
            assert row["steps"] == s.steps(row["n"]) == len(row["losses"])
            assert row["lr"] == saved["lr_selection"]["chosen"]
            assert all(math.isfinite(x) for x in row["losses"])
    # Every arm trains on the same responses: the sibling's, judged; the wrong ones only in NLFT's records.
    task = get_task("add2")
    for seed in s.seeds:
        responses = saved["responses"][str(seed)]
        problems = task.problems("train", max(s.n), seed)
        assert [r["problem"] for r in responses] == list(range(max(s.n)))
        for r in responses:
            assert r["correct"] == task.judge(problems[r["problem"]], r["response"]).correct == (r["slip"] is None)
        n = max(s.n)
        nlft, sft = runs[ba.run_key("nlft", n, seed)], runs[ba.run_key("sft", n, seed)]
        assert nlft["records"] == sft["records"] == n and sft["wrong_records"] == 0
        assert nlft["wrong_records"] == sum(not r["correct"] for r in responses)
        assert runs[ba.run_key("sft_correct", n, seed)]["records"] == n - nlft["wrong_records"]
        assert len(saved["diagnostics"][str(seed)]) == n
    # The learning rate: chosen on the validation split from the grid, by SFT's and NLFT's mean.
    selection = saved["lr_selection"]
    assert selection["chosen"] in s.lr_grid and len(selection["runs"]) == 2 * len(s.lr_grid)
    assert selection["mean_accuracy"][f"{selection['chosen']:g}"] == max(selection["mean_accuracy"].values())
    # The comparisons: the layout readme_tables reads, and statistics that recompute.
    main = [c for c in saved["comparisons"] if c["comparison"] == "nlft - sft"]
    assert [c["n"] for c in main] == list(s.n)
    for c in main:
        accuracies = [(runs[ba.run_key("nlft", c["n"], x)]["accuracy"], runs[ba.run_key("sft", c["n"], x)]["accuracy"])
                      for x in s.seeds]  # fmt: skip
        assert c["difference"] == pytest.approx(np.mean([b - a for b, a in accuracies]))
        assert len(c["ci95"]) == 2 and c["ci95"][0] <= c["difference"] <= c["ci95"][1]
        assert len(c["mcnemar_p"]) == len(s.seeds) and 0 <= c["p_holm"] <= 1
    assert set(saved["diagnostics_summary"]) == {str(n) for n in s.n}
    d = saved["diagnostics_summary"][str(max(s.n))]
    assert d["records"] == max(s.n) * len(s.seeds) and 0 <= d["correct_share"] <= 1
    md = out.with_suffix(".md").read_text()
    assert md.startswith("**Result:** n = 2: NLFT ") and "| SFT (same responses) |" in md and "6% rule" in md
    assert out.with_suffix(".png").stat().st_size > 1000
    # docs/study.md's generated part: the command, the JSON, the plot and the table.
    from benchmarks import readme_tables

    section = readme_tables.render_study("study", tmp_path, tmp_path)
    assert "[accuracy_tiny.json](accuracy_tiny.json)" in section and "![accuracy_tiny](accuracy_tiny.png)" in section
    assert md.strip() in section and readme_tables.render_study("llm-judge", tmp_path, tmp_path) == "Not run yet."

    # A crash after some runs: --resume redoes only what is missing, the same seeds giving the same models.
    crashed = json.loads(out.read_text())
    kept = {k: v for k, v in crashed["runs"].items() if k.endswith("_s0") or k == "base"}
    crashed["runs"], crashed["complete"] = kept, False
    del crashed["comparisons"]
    out.write_text(json.dumps(crashed))
    resumed = ba.main([*argv, "--resume"])
    assert resumed["complete"] and resumed["resumed_at"]
    for key in kept:  # not recomputed
        assert resumed["runs"][key]["eval_seconds"] == kept[key]["eval_seconds"]
    for key in set(runs) - set(kept):
        assert resumed["runs"][key]["losses"] == pytest.approx(runs[key]["losses"], rel=1e-5)
        assert resumed["runs"][key]["per_question"] == runs[key]["per_question"]
    with pytest.raises(SystemExit, match="other settings"):  # another design cannot resume this file
        ba.main([*argv, "--resume", "--n", "3"])
    # --report-only recomputes the summaries from the runs, with no model and no resume mark of its own.
    recorded = json.loads(out.read_text())
    recorded["comparisons"], recorded["diagnostics_summary"] = [], {}
    out.write_text(json.dumps(recorded))
    again = ba.main(["--preset", "tiny", "--out", str(out), "--report-only"])
    assert again["comparisons"] == resumed["comparisons"]
    # the run's own resume marks stay (what was run), none of this call's is added
    assert (again["resumed_at"], again["resumed_command"]) == (resumed["resumed_at"], resumed["resumed_command"])
    assert again["diagnostics_summary"] == resumed["diagnostics_summary"]
    assert set(again["diagnostics_per_run"]) == {f"n{n}_s{x}" for n in s.n for x in s.seeds}
    del recorded["runs"]["base"]
    out.write_text(json.dumps(recorded))
    with pytest.raises(SystemExit, match="lacks runs"):
        ba.main(["--preset", "tiny", "--out", str(out), "--report-only"])


def test_llm_judge_writes_the_judgment_and_keeps_the_rules_verdict():
    from nlft_kernels.recipes.tasks import get_task
    from tests._judge_server import StubServer, chat_reply

    task = get_task("add2")
    (p,) = task.problems("train", 1, SEED)
    wrong = p.solution.replace(p.answer, str(int(p.answer) + 10))
    replies = [
        json.dumps({"judgment": "The sum drops a carry.", "correct": False}),
        json.dumps({"judgment": "The answer is right.", "correct": True}),  # a weak judge's wrong verdict
        "",  # no text at all
    ]

    def handle(number: int, body: dict):
        return 200, chat_reply(replies[min(number, 2)]), 0.0

    with StubServer(handle) as server:
        judge = ba.llm_judge(task, server.base_url, "stub")
        assert judge(p, p.solution) == task.judge(p, p.solution)  # a right response: no request
        assert not server.requests
        first = judge(p, wrong)
        assert (first.correct, first.judgment) == (False, "The sum drops a carry.")
        question = server.requests[0]["body"]["messages"][-1]["content"]
        assert p.question in question and "Q: What is 27 + 45?" not in question  # the question, not the shots
        # The model calls the wrong sum right: the verdict stays the rule's, the text is the model's.
        second = judge(p, wrong)
        assert (second.correct, second.judgment) == (False, "The answer is right.")
        third = judge(p, wrong)  # an empty reply: the rule's judgment, counted
        assert third == task.judge(p, wrong)
    counts = {"asked": 3, "llm_said_wrong": 1, "llm_said_right": 1, "no_verdict": 1, "fallback_to_rule": 1}
    assert judge.counts == counts
