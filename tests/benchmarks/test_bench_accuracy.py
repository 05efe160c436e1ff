"""benchmarks/bench_accuracy.py: its statistics against independent computations, the SFT target
and loss, and a whole tiny study (tiny random Llama, a GSM8K-shaped folder) with its resume."""

import json
import math
import random

import pytest
import torch

from benchmarks import bench_accuracy as ba
from nlft_kernels.recipes.rule_judge import extract_answer
from tests._tiny import tiny_model, tiny_tokenizer
from tests.test_cli import ROWS

SEED = 20261125


def test_wilson_interval_solves_the_score_equation():
    # The Wilson bounds are the two p with |phat - p| = z * sqrt(p (1 - p) / n).
    z = 1.959964
    for correct, count in ((0, 10), (3, 10), (57, 200), (200, 200)):
        low, high = ba.wilson_interval(correct, count, z)
        phat = correct / count
        assert low <= phat <= high
        for p in (low, high):
            if 0 < p < 1:
                assert abs(abs(phat - p) - z * math.sqrt(p * (1 - p) / count)) < 1e-9


def test_mcnemar_matches_scipy_binomial_test():
    from scipy.stats import binomtest

    rng = random.Random(SEED)
    print("seed", SEED)
    for _ in range(20):
        n = rng.randint(5, 60)
        a = [rng.random() < 0.4 for _ in range(n)]
        b = [rng.random() < 0.5 for _ in range(n)]
        only_a = sum(x and not y for x, y in zip(a, b, strict=True))
        only_b = sum(y and not x for x, y in zip(a, b, strict=True))
        expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert ba.mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-12)


def test_paired_bootstrap_interval():
    rng = random.Random(SEED)
    a = [rng.random() < 0.3 for _ in range(200)]
    b = [x or rng.random() < 0.2 for x in a]  # b right wherever a is, and more: a positive shift
    low, high = ba.paired_bootstrap(a, b, resamples=2000, seed=1)
    observed = (sum(b) - sum(a)) / len(a)
    assert 0 < low <= observed <= high
    assert ba.paired_bootstrap(a, a, resamples=200) == (0.0, 0.0)  # same answers: no difference at all


@pytest.mark.parametrize("row", ROWS, ids=["natalia", "weng", "betty"])
def test_sft_target_keeps_the_answer_in_the_instructions_form(row):
    target = ba.sft_target(row["answer"])
    assert "<<" not in target and "####" not in target
    assert target.splitlines()[-1].startswith("The answer is ")
    assert extract_answer(target) == extract_answer(row["answer"])


def test_sft_loss_is_the_mean_response_cross_entropy():
    from nlft_kernels.training.data import NLFTCollator, encode_records
    from tests._tiny import tiny_records

    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer), seed=3).double()
    batch = NLFTCollator(tokenizer.pad_token_id)(encode_records(tiny_records(), tokenizer))
    assert (batch["labels"] == -100).any()  # responses of different lengths: padding is exercised
    loss = ba.sft_loss(model, batch)
    logits = model(input_ids=batch["base_input_ids"], attention_mask=batch["base_attention_mask"]).logits
    rows = logits.gather(1, batch["base_rows"].unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    keep = batch["labels"] != -100
    nll = -torch.log_softmax(rows, -1).gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # transformers computes its loss from float32 logits: float32 agreement with the float64 rows.
    torch.testing.assert_close(loss.double(), nll[keep].mean(), rtol=2e-6, atol=1e-7)


@pytest.fixture(scope="module")
def study_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("accuracy")
    tokenizer = tiny_tokenizer()
    tiny_model(len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = root / "data"
    data.mkdir()
    for split in ("train", "test"):
        rows = [ROWS[i % len(ROWS)] for i in range(6)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_tiny_study_end_to_end_and_resume(study_inputs, tmp_path):
    out = tmp_path / "accuracy.json"
    argv = ["--preset", "tiny", "--model", str(study_inputs / "model"), "--data", str(study_inputs / "data"),
            "--out", str(out), "--no-progress"]  # fmt: skip
    payload = ba.main(argv)
    settings = ba.PRESETS["tiny"]
    assert payload["complete"] and json.loads(out.read_text())["complete"]
    runs = payload["runs"]
    assert set(runs) == {"base"} | {f"{m}_n{n}" for n in settings.n for m in ("sft", "nlft")}
    for key, row in runs.items():
        assert len(row["per_question"]) == row["count"] == settings.test_size
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
        if key != "base":
            assert row["steps"] == settings.steps(row["n"]) and len(row["losses"]) == row["steps"]
            assert all(math.isfinite(x) for x in row["losses"])
    # The random model's sampled responses are wrong: NLFT trains on judged wrong responses, SFT on none.
    assert runs[f"nlft_n{settings.n[-1]}"]["wrong_records"] > 0 and runs[f"sft_n{settings.n[-1]}"]["wrong_records"] == 0
    assert all(not j["correct"] and j["judgment"] for j in payload["sampled"])
    # The smaller training set is the first part of the larger one.
    assert len(payload["sampled"]) == max(settings.n) and len(set(payload["test_indices"])) == settings.test_size
    kinds = {(c["n"], c["comparison"]) for c in payload["comparisons"]}
    assert kinds == {(n, c) for n in settings.n for c in ("nlft - sft", "sft - base", "nlft - base")}
    md = out.with_suffix(".md").read_text()
    assert "| NLFT |" in md and "| SFT |" in md and "63.46%" in md  # the authors' table beside ours
    assert md.startswith("**Result:** n = 2: NLFT ") and "95% CI" in md.splitlines()[0]
    assert out.with_suffix(".png").stat().st_size > 1000

    # A crash after the base evaluation and the first run: --resume redoes only what is missing.
    crashed = json.loads(out.read_text())
    kept = {k: crashed["runs"][k] for k in ("base", f"sft_n{settings.n[0]}")}
    crashed["runs"], crashed["complete"] = kept, False
    crashed.pop("comparisons")
    out.write_text(json.dumps(crashed))
    resumed = ba.main([*argv, "--resume"])
    assert resumed["complete"] and resumed["resumed_at"]
    for key in kept:  # not recomputed: the same evaluation time to the last digit
        assert resumed["runs"][key]["eval_seconds"] == kept[key]["eval_seconds"]
    assert set(resumed["runs"]) == set(runs)
    # The same seeds give the same trained models: the redone runs answer as before.
    for key in set(runs) - set(kept):
        assert resumed["runs"][key]["losses"] == pytest.approx(runs[key]["losses"], rel=1e-5)

    # Resumed with fewer training-set sizes than planned: the larger one is dropped and said so.
    small = settings.n[0]
    fewer = ba.main([*argv, "--resume", "--n", str(small)])
    assert set(fewer["runs"]) == {"base", f"sft_n{small}", f"nlft_n{small}"}
    assert fewer["runs"][f"nlft_n{small}"]["eval_seconds"] == resumed["runs"][f"nlft_n{small}"]["eval_seconds"]
    assert {c["n"] for c in fewer["comparisons"]} == {small} and fewer["settings"]["n"] == [small]
    assert any("not run" in note for note in fewer["notes"]) and "--n" in fewer["resumed_command"]
    assert fewer["train_indices"] == payload["train_indices"]  # the planned run's subsets
    with pytest.raises(SystemExit, match="other settings"):  # a size never planned cannot be resumed
        ba.main([*argv, "--resume", "--n", "3"])


def test_resume_refuses_other_settings(study_inputs, tmp_path):
    out = tmp_path / "accuracy.json"
    out.write_text(json.dumps({"settings": {"n": [1]}, "runs": {}}))
    with pytest.raises(SystemExit, match="other settings"):
        ba.main(["--preset", "tiny", "--model", str(study_inputs / "model"), "--data", str(study_inputs / "data"),
                 "--out", str(out), "--resume"])  # fmt: skip
