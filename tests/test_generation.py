"""Batched generation and GSM8K evaluation on a tiny random Llama model."""

import pytest
import torch

import nlft_kernels.recipes.generation as generation
from nlft_kernels.recipes.generation import (
    GSM8K_INSTRUCTION,
    GenerationSettings,
    evaluate_gsm8k,
    generate_responses,
    prompts,
    sample_rows,
)
from tests._tiny import tiny_model, tiny_tokenizer

QUESTIONS = [
    "Natalia sold 48 clips in April and half as many in May. How many in all?",
    "How many clips?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much?",
]
ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
        for i in range(10)]  # fmt: skip


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"  # generate_responses must pad on the left whatever it is given
    return tiny_model(len(tokenizer), seed=1), tokenizer


@pytest.mark.parametrize("chat_template", [True, False])
def test_prompts_carry_the_instruction(chat_template):
    tokenizer = tiny_tokenizer(chat_template=chat_template)
    texts = prompts(tokenizer, QUESTIONS[:1])
    assert GSM8K_INSTRUCTION in texts[0] and QUESTIONS[0] in texts[0]
    assert ("<|assistant|>" in texts[0]) == chat_template


def test_batched_equals_one_by_one(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # Prompts of different lengths: batching pads them, which must not change a greedy answer.
    assert len({len(t) for t in prompts(tokenizer, QUESTIONS)}) == len(QUESTIONS)
    batched = generate_responses(
        model, tokenizer, QUESTIONS, settings=GenerationSettings(6, batch_size=3), progress=False
    )
    one = GenerationSettings(6, batch_size=1)
    single = [generate_responses(model, tokenizer, [q], settings=one, progress=False)[0] for q in QUESTIONS]
    assert batched == single and len(batched) == len(QUESTIONS)
    assert all(batched) and tokenizer.padding_side == "right"


def test_sampling_is_seeded(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    run = lambda seed: generate_responses(
        model,
        tokenizer,
        QUESTIONS,
        settings=GenerationSettings(8, temperature=1.0, seed=seed, batch_size=2),
        progress=False,
    )
    first = run(0)
    assert run(0) == first
    assert any(run(s) != first for s in (1, 2, 3))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a whole number >= 1, got 0"),
        ({"seed": -1}, "seed must be a whole number >= 0, got -1"),
        ({"temperature": 0.0}, "temperature must be a positive finite number"),
    ],
)
def test_bad_settings(fields, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**fields)


def test_evaluation_is_greedy(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="greedily"):
        evaluate_gsm8k(model, tokenizer, ROWS, n=2, settings=GenerationSettings(4, temperature=0.7), progress=False)


def test_sample_rows():
    chosen = sample_rows(ROWS, 4, seed=0)
    assert chosen == sample_rows(ROWS, 4, seed=0) and len(chosen) == 4
    assert [i for i, _ in chosen] == sorted({i for i, _ in chosen})
    assert any(sample_rows(ROWS, 4, seed=s) != chosen for s in (1, 2, 3))
    assert [i for i, _ in sample_rows(ROWS, None, 0)] == list(range(len(ROWS)))
    assert len(sample_rows(ROWS, 100, 0)) == len(ROWS)
    with pytest.raises(ValueError):
        sample_rows(ROWS, 0, 0)


def test_evaluate_counts_right_answers(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    # A fake model that answers the even-numbered questions right and the others wrong.
    answers = {r["question"]: int(r["answer"].split("####")[1]) for r in ROWS}

    def fake_generate(model, tokenizer, questions, **kwargs):
        return [f"The answer is {answers[q] + (int(q.split()[2]) % 2)}." for q in questions]

    monkeypatch.setattr(generation, "generate_responses", fake_generate)
    result = evaluate_gsm8k(model, tokenizer, ROWS, n=6)
    expected = sum(1 for s in result["samples"] if s["index"] % 2 == 0)
    assert result["count"] == 6 and result["correct"] == expected and result["accuracy"] == expected / 6
    assert all(s["correct"] == (s["predicted"] == s["reference"]) for s in result["samples"])
    assert 0 < expected < 6


def test_evaluate_end_to_end(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()
    settings = GenerationSettings(4, seed=5, batch_size=2)
    result = evaluate_gsm8k(model, tokenizer, ROWS, n=3, settings=settings, progress=False)
    assert result["count"] == 3 and result["seed"] == 5 and result["accuracy"] == 0.0
    assert [s["index"] for s in result["samples"]] == [i for i, _ in sample_rows(ROWS, 3, 5)]
    assert all(s["reference"] == str(2 * s["index"]) for s in result["samples"])
    # Generation runs in eval mode without autograd and leaves both as they were.
    assert model.training and torch.is_grad_enabled()
    assert isinstance(result["samples"][0]["response"], str)
