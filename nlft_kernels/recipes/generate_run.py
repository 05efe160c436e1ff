"""Generate responses into a JSONL file, losing nothing on a crash or Ctrl-C: each batch's rows are
appended and flushed as soon as the batch is done, and a rerun generates only the questions the
file does not hold yet (a row is known by a hash of its question, reference and instruction, so an
edited or dropped question is generated again and its old row is dropped). A file written with
other settings (model, max_new_tokens, temperature, seed) is refused, never mixed into, and one
process writes a file at a time: the output is a :class:`~nlft_kernels.recipes.jsonl_store.JsonlStore`.

Prompts longer than the model's context (less ``max_new_tokens``) are skipped with their count and
row: one long question must not drive generation out of memory.

Output rows: ``id``, ``index`` (the question's row in the data), ``question``, ``answer``,
``instruction``, ``response``, ``generation`` (the settings that made it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nlft_kernels.recipes.errors import BadInput
from nlft_kernels.recipes.jsonl_store import JsonlStore, content_keys

# tokenizer.model_max_length when a tokenizer sets none (transformers' VERY_LARGE_INTEGER).
_UNSET_LENGTH = 10**18


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


@dataclass(frozen=True)
class TooLong:
    """A question whose prompt does not fit the model's context with ``max_new_tokens`` after it."""

    index: int
    prompt_tokens: int
    budget: int


@dataclass
class GenerateRun:
    """What one run did: ``total`` questions, ``skipped`` (already in the file), ``generated`` now,
    ``dropped`` (rows of questions no longer asked, removed), ``too_long`` (not generated)."""

    total: int = 0
    skipped: int = 0
    generated: int = 0
    dropped: int = 0
    too_long: list[TooLong] = field(default_factory=list)


def context_length(model, tokenizer) -> int | None:
    """The most tokens ``model`` reads at once: the smallest of its config's position limit and the
    tokenizer's ``model_max_length``, when they are set; None when nothing says."""
    config = getattr(model, "config", None)
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions", "seq_length")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [n for n in limits if isinstance(n, int) and 0 < n < _UNSET_LENGTH]
    return min(limits) if limits else None


def prompts_too_long(
    model, tokenizer, chosen: Sequence[tuple[int, dict]], instruction: str, max_new_tokens: int
) -> list[TooLong]:
    """The questions of ``chosen`` ((index, row) pairs) whose base-view prompt plus ``max_new_tokens``
    exceeds :func:`context_length`. BadInput when ``max_new_tokens`` alone fills the context."""
    from nlft_kernels.recipes.generation import prompts

    context = context_length(model, tokenizer)
    if context is None or not chosen:
        return []
    budget = context - max_new_tokens
    if budget < 1:
        raise BadInput(f"--max-new-tokens {max_new_tokens} fills the model's context of {context} tokens: lower it")
    texts = prompts(tokenizer, [row["question"] for _, row in chosen], instruction)
    with_specials = not getattr(tokenizer, "chat_template", None)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=with_specials)["input_ids"]]
    return [TooLong(i, n, budget) for (i, _), n in zip(chosen, lengths, strict=True) if n > budget]


def describe_too_long(too_long: Sequence[TooLong], source: str) -> str:
    """One line naming the questions :func:`prompts_too_long` found (the first few)."""
    first = ", ".join(f"row {t.index} ({t.prompt_tokens} tokens)" for t in too_long[:3])
    more = f" and {len(too_long) - 3} more" if len(too_long) > 3 else ""
    return (
        f"{len(too_long)} questions of {source} have prompts over the {too_long[0].budget} tokens the model's "
        f"context leaves beside --max-new-tokens: {first}{more}"
    )


KEY_FIELDS = ("question", "answer", "instruction")


@dataclass
class GeneratePlan:
    """What is left to generate into its output (an open :class:`JsonlStore`: locked, resumed):
    the (key, index, row) of each question it does not hold yet, the settings (and the ``stamp``
    of them each row carries), the counts so far. A context manager: leaving it releases the file."""

    store: JsonlStore
    instruction: str
    settings: GenerationSettings
    stamp: dict
    todo: list[tuple[str, int, dict]]
    run: GenerateRun

    @property
    def out(self) -> Path:
        return self.store.path

    def __enter__(self) -> GeneratePlan:
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()


def plan_generation(
    chosen: Sequence[tuple[int, dict]],
    out: str | os.PathLike,
    *,
    instruction: str,
    settings: GenerationSettings = GenerationSettings(),
    model_name: str = "",
    overwrite: bool = False,
) -> GeneratePlan:
    """The questions of ``chosen`` ((index, row with question and answer) pairs) that the JSONL
    file ``out`` does not hold yet (all of them with ``overwrite``), ``out`` locked for this run
    (:class:`~nlft_kernels.recipes.jsonl_store.JsonlStore`: one writer). Done before the model
    loads: a file that is not ``nlft generate``'s, or was made with other settings, is BadInput
    and left untouched; rows of questions no longer asked (edited, dropped, not chosen) and a last
    row a crash cut short are removed."""
    stamp = {"model": model_name, "max_new_tokens": settings.max_new_tokens}
    stamp |= {"temperature": settings.temperature, "seed": settings.seed}
    store = JsonlStore(out, kind="`nlft generate`", owner_field="generation", owner=stamp, owner_label="generated with")
    keys = content_keys([row | {"instruction": instruction} for _, row in chosen], KEY_FIELDS)
    resume = store.open(keys, overwrite=overwrite)
    todo = [(key, index, row) for key, (index, row) in zip(keys, chosen, strict=True) if key not in resume.done]
    # Shortest questions first, as generate_responses batches them: less padding.
    todo.sort(key=lambda item: len(item[2]["question"]))
    run = GenerateRun(total=len(keys), skipped=len(keys) - len(todo), dropped=resume.stale)
    return GeneratePlan(store, instruction, settings, stamp, todo, run)


def generate_file(model, tokenizer, plan: GeneratePlan, *, progress: bool = True) -> GenerateRun:
    """Generate :func:`plan_generation`'s questions into its file; returns the run's counts.

    Questions whose prompts do not fit the model's context are skipped (``too_long``); the rest
    are generated ``batch_size`` at a time, each batch's rows appended and flushed when it is
    done, so Ctrl-C (KeyboardInterrupt, passed on) or a kill keeps every finished batch."""
    from tqdm.auto import tqdm

    from nlft_kernels.recipes.generation import generate_responses

    settings, run = plan.settings, plan.run
    run.too_long = prompts_too_long(
        model, tokenizer, [(i, r) for _, i, r in plan.todo], plan.instruction, settings.max_new_tokens
    )
    skip = {t.index for t in run.too_long}
    todo = [item for item in plan.todo if item[1] not in skip]
    bar = tqdm(total=len(todo), desc="generate", unit="response", disable=not progress)
    try:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            responses = generate_responses(
                model,
                tokenizer,
                [row["question"] for _, _, row in batch],
                batch_size=settings.batch_size,
                max_new_tokens=settings.max_new_tokens,
                greedy=settings.temperature is None,
                temperature=settings.temperature or 1.0,
                seed=settings.seed + start,
                instruction=plan.instruction,
                progress=False,
            )
            for (key, index, row), response in zip(batch, responses, strict=True):
                line = {"id": key, "index": index, "question": row["question"], "answer": row["answer"]}
                line |= {"instruction": plan.instruction, "response": response, "generation": plan.stamp}
                plan.store.append(line)  # flushed: a kill after it keeps the row
            run.generated += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
    return run
