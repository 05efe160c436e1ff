"""Batched generation of responses and GSM8K evaluation (greedy, fixed-seed subsets)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nlft_kernels.recipes.rule_judge import answers_equal, extract_answer, format_number
from nlft_kernels.training.data import NLFTRecord, PromptTemplates

# The system prompt of the base view for GSM8K: generation, evaluation and the NLFT records the
# judge writes all use it, so that training sees the prompt the responses were sampled under.
GSM8K_INSTRUCTION = (
    "Solve the math problem step by step. Write each calculation as an equation, "
    "and end with 'The answer is N', where N is a number."
)


@dataclass(frozen=True)
class GenerationSettings:
    """How responses are generated, checked on creation: at most ``max_new_tokens`` per response,
    greedy (``temperature`` None) or sampled at ``temperature`` with ``seed``, ``batch_size``
    prompts at once."""

    max_new_tokens: int = 256
    temperature: float | None = None
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name, low in (("max_new_tokens", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
        t = self.temperature
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < math.inf)):
            raise ValueError(f"temperature must be a positive finite number (or none: greedy), got {t!r}")


def prompts(tokenizer, questions: Sequence[str], instruction: str = GSM8K_INSTRUCTION) -> list[str]:
    """The base-view prompt of each question (through the chat template when the tokenizer has one)."""
    templates = PromptTemplates()
    return [templates.render("base", NLFTRecord(q, "", "", instruction=instruction), tokenizer) for q in questions]


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    questions: Sequence[str],
    *,
    settings: GenerationSettings = GenerationSettings(),
    instruction: str | None = GSM8K_INSTRUCTION,
    progress: bool = True,
    desc: str = "generate",
    stop: Sequence[str] = (),
    share_prefix: bool = False,
) -> list[str]:
    """One response per question, generated in batches of ``settings.batch_size`` (left-padded
    prompts), at most ``settings.max_new_tokens`` tokens each.

    Greedy by default; a ``settings.temperature`` samples at it from a generator seeded with
    ``settings.seed``. Questions are batched by prompt length (less padding) and answers returned
    in the order of ``questions``. Special tokens are removed from the text. ``stop``: strings
    that end a row's generation (e.g. ``"\n\n"`` for tasks read up to the first blank line; the
    text keeps the stop string); ``instruction`` None: the templates' default system prompt.
    ``share_prefix``: batches of prompts of one token length, the tokens they all start with (a
    task's worked examples) run once per batch and their KV cache reused by every row.
    """
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    batch_size, max_new_tokens, temperature = settings.batch_size, settings.max_new_tokens, settings.temperature
    texts = prompts(tokenizer, questions, instruction)
    with_specials = not getattr(tokenizer, "chat_template", None)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    if share_prefix:  # rows of one token length: no padding before the shared tokens
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=with_specials)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
    responses: list[str] = [""] * len(texts)
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    torch.manual_seed(settings.seed)
    sampling = (
        {"do_sample": False} if temperature is None else {"do_sample": True, "temperature": temperature, "top_k": 0}
    )
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if share_prefix:
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(lengths[i], []).append(i)
        batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    # The bar counts decoding steps (max_new_tokens per batch), so it moves during a batch.
    bar = tqdm(total=len(batches) * max_new_tokens, desc=desc, unit="step", disable=not progress)
    try:
        for number, batch in enumerate(batches, 1):
            bar.set_postfix_str(f"batch {number}/{len(batches)}")
            encoded = tokenizer(
                [texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=with_specials
            ).to(device)
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([_ProgressStep(bar)]),
                **({"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}),
                **(_prefix_cache(model, encoded) if share_prefix else {}),
                **sampling,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
                responses[i] = text.strip()
            bar.update(number * max_new_tokens - bar.n)  # a batch that stopped early: the rest at once
    finally:
        bar.close()
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return responses


def _prefix_cache(model, encoded) -> dict:
    """``generate``'s keyword for the KV cache of the tokens every row of ``encoded`` starts
    with, repeated for each row (``generate`` then runs only the rest of each prompt); empty when
    the rows are padded or share fewer than 16 tokens."""
    import inspect

    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    if ids.shape[0] < 2 or not bool(mask.all()):
        return {}
    shared = int((ids == ids[:1]).all(0).long().cumprod(0).sum())
    shared = min(shared, ids.shape[1] - 1)  # generate needs at least one prompt token to run
    if shared < 16:
        return {}
    out = model(input_ids=ids[:1, :shared], attention_mask=mask[:1, :shared], use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_repeat_interleave(ids.shape[0])
    # transformers 5.2x calls it ``cache`` (``past_key_values`` is deprecated there), earlier ones not.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


class _ProgressStep:
    """A stopping criterion that never stops: it advances a progress bar by one decoding step."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def sample_rows(rows: Sequence[dict], n: int | None, seed: int) -> list[tuple[int, dict]]:
    """``n`` (index, row) pairs drawn without replacement with ``random.Random(seed)``, in index
    order; all rows when ``n`` is None or at least ``len(rows)``."""
    if n is not None and n < 1:
        raise ValueError(f"the number of samples must be >= 1, got {n}")
    indices = (
        range(len(rows)) if n is None or n >= len(rows) else sorted(random.Random(seed).sample(range(len(rows)), n))
    )
    return [(i, rows[i]) for i in indices]


def evaluate_gsm8k(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    n: int | None = 50,
    settings: GenerationSettings = GenerationSettings(),
    instruction: str = GSM8K_INSTRUCTION,
    progress: bool = True,
) -> dict:
    """GSM8K accuracy of ``model`` on ``n`` rows drawn with ``settings.seed`` (greedy decoding:
    ``settings`` without a temperature, else ValueError; its max_new_tokens and batch size).

    A response is right when its final answer (:func:`nlft_kernels.recipes.rule_judge.extract_answer`) equals
    the reference's ``#### n``. Returns ``{"accuracy", "correct", "count", "seed",
    "max_new_tokens", "samples": [{"index", "question", "response", "predicted", "reference",
    "correct"}, ...]}``.
    """
    if settings.temperature is not None:
        raise ValueError(f"evaluation decodes greedily: settings.temperature must be None, got {settings.temperature}")
    chosen = sample_rows(rows, n, settings.seed)
    questions = [row["question"] for _, row in chosen]
    responses = generate_responses(
        model, tokenizer, questions, settings=settings, instruction=instruction, progress=progress, desc="eval"
    )
    samples = []
    for (index, row), response in zip(chosen, responses, strict=True):
        predicted, reference = extract_answer(response), extract_answer(row["answer"])
        samples.append(
            {
                "index": index,
                "question": row["question"],
                "response": response,
                "predicted": None if predicted is None else format_number(predicted),
                "reference": None if reference is None else format_number(reference),
                "correct": answers_equal(predicted, reference),
            }
        )
    correct = sum(s["correct"] for s in samples)
    return {
        "accuracy": correct / len(samples) if samples else 0.0,
        "correct": correct,
        "count": len(samples),
        "seed": settings.seed,
        "max_new_tokens": settings.max_new_tokens,
        "samples": samples,
    }
