"""The pieces of a learning study on a :class:`~nlft_kernels.recipes.tasks.Task`: greedy evaluation,
the training responses (the model's own samples or a stronger sibling's), the records each arm
trains on, and a training loop that gives every arm the same steps, adapter initialisation and
batch order.

    from nlft_kernels.recipes.study import evaluate, sibling_responses, arm_records, fit_arm
    task = get_task("add2")
    before = evaluate(model, tokenizer, task, task.problems("test", 300))
    judged = sibling_responses(task, task.problems("train", 50, seed=1), accuracy=0.8, seed=1)
    trained = fit_arm(model, tokenizer, arm_records(task, judged, "nlft"), "nlft", steps=25, lr=3e-4, seed=1)
    after = evaluate(trained, tokenizer, task, ...)

The arms (:data:`ARMS`): ``nlft`` (the judged responses; a wrong one's judgment in the judge view),
``sft`` (the same responses, plain cross-entropy: the authors' baseline), ``sft_correct`` (the
right responses only: rejection sampling), ``sft_reference`` (the reference solutions).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from nlft_kernels.recipes.tasks import Problem, Task
from nlft_kernels.training.data import NLFTRecord

ARMS = ("sft", "nlft", "sft_correct", "sft_reference")
SOURCES = ("sibling", "own")


@dataclass
class Evaluation:
    """Greedy answers of one model to a list of problems: ``correct`` per problem (in order),
    the responses as read (:meth:`Task.read`), the accuracy and its 95% Wilson interval."""

    correct: list[bool]
    responses: list[str]
    accuracy: float
    ci95: tuple[float, float]
    seconds: float = 0.0

    @property
    def count(self) -> int:
        return len(self.correct)

    def to_dict(self, responses: int = 3) -> dict:
        """JSON fields: accuracy, correct, count, ci95, per_question, seconds, the first responses."""
        return {
            "accuracy": self.accuracy,
            "correct": sum(self.correct),
            "count": self.count,
            "ci95": list(self.ci95),
            "per_question": list(self.correct),
            "eval_seconds": self.seconds,
            "responses_sample": self.responses[:responses],
        }


def wilson_interval(correct: int, count: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``correct / count`` (scipy's ``binomtest(...).proportion_ci``)."""
    from scipy.stats import binomtest

    if count == 0:
        return (0.0, 1.0)
    ci = binomtest(correct, count).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def generate(
    model,
    tokenizer,
    task: Task,
    problems: Sequence[Problem],
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """The model's responses to ``problems`` under ``task``'s prompt, as the task reads them."""
    from nlft_kernels.recipes.generation import GenerationSettings, generate_responses

    settings = GenerationSettings(
        max_new_tokens=max_new_tokens or task.max_new_tokens,
        temperature=None if greedy else temperature,
        seed=seed,
        batch_size=batch_size,
    )
    texts = generate_responses(
        model,
        tokenizer,
        [task.prompt(p) for p in problems],
        settings=settings,
        instruction=task.instruction,
        progress=progress,
        desc=desc,
        stop=task.stop_strings,
        share_prefix=task.share_prefix,  # the worked examples: one KV cache per batch
    )
    return [task.read(t) for t in texts]


def evaluate(
    model,
    tokenizer,
    task: Task,
    problems: Sequence[Problem],
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> Evaluation:
    """Greedy accuracy of ``model`` on ``problems``, judged by ``task``'s judge (``max_new_tokens``:
    default the task's)."""
    import time

    started = time.perf_counter()
    responses = generate(
        model, tokenizer, task, problems, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
        desc="eval",
    )  # fmt: skip
    correct = [task.judge(p, r).correct for p, r in zip(problems, responses, strict=True)]
    hits = sum(correct)
    return Evaluation(
        correct,
        responses,
        hits / max(1, len(correct)),
        wilson_interval(hits, len(correct)),
        time.perf_counter() - started,
    )


# ------------------------------------------------------------------------------ responses


@dataclass
class JudgedResponse:
    """One training response: the problem it answers (its position in the drawn list), the
    response, the judge's verdict and judgment, and where it came from (``sibling``: the slip's
    kind or None; ``own``: the sample number)."""

    problem: int
    response: str
    correct: bool
    judgment: str | None
    source: str
    slip: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def judge_all(task: Task, problems: Sequence[Problem], rows: list[tuple[int, str, str, str | None]], judge=None):
    """Judge ``(problem index, response, source, slip)`` rows: ``judge(problem, response)`` or the task's."""
    judge = judge or task.judge
    out = []
    for index, response, source, slip in rows:
        verdict = judge(problems[index], response)
        out.append(JudgedResponse(index, response, verdict.correct, verdict.judgment, source, slip))
    return out


def sibling_responses(
    task: Task, problems: Sequence[Problem], *, accuracy: float, seed: int, k: int = 1, judge=None
) -> list[JudgedResponse]:
    """``k`` responses per problem from the stronger sibling (:meth:`Task.solve`): right with
    probability ``accuracy``, else one slip; each judged (by ``judge`` or the task's judge)."""
    if not task.has_solver:
        raise ValueError(f"task {task.name!r} has no sibling solver: use the model's own samples")
    rng = random.Random(f"sibling:{task.name}:{seed}")
    rows = []
    for index, problem in enumerate(problems):
        for _ in range(k):
            response, slip = task.solve(problem, rng, accuracy)
            rows.append((index, response, "sibling", slip))
    return judge_all(task, problems, rows, judge)


def own_responses(
    model,
    tokenizer,
    task: Task,
    problems: Sequence[Problem],
    *,
    seed: int,
    k: int = 1,
    temperature: float = 0.7,
    batch_size: int = 32,
    progress: bool = False,
    judge=None,
) -> list[JudgedResponse]:
    """``k`` sampled responses per problem from ``model`` itself at ``temperature``, judged."""
    rows = []
    for sample in range(k):
        texts = generate(
            model, tokenizer, task, problems, greedy=False, temperature=temperature, seed=seed * 1000 + sample,
            batch_size=batch_size, progress=progress, desc=f"sample {sample + 1}/{k}",
        )  # fmt: skip
        rows += [(i, t, f"own:{sample}", None) for i, t in enumerate(texts)]
    rows.sort(key=lambda row: row[0])  # the k responses of a problem together, so a prefix is whole problems
    return judge_all(task, problems, rows, judge)


# ------------------------------------------------------------------------------ records


def arm_records(
    task: Task, problems: Sequence[Problem], judged: Sequence[JudgedResponse], arm: str
) -> list[NLFTRecord]:
    """The records ``arm`` trains on (see the module docstring); the prompt is the task's (its
    worked examples in the question field) and the standard view shows the reference solution."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")

    def record(j: JudgedResponse, response: str, correct: bool, judgment: str | None) -> NLFTRecord:
        p = problems[j.problem]
        return NLFTRecord(task.prompt(p), response, p.solution, judgment, correct, task.instruction)

    if arm == "nlft":
        return [record(j, j.response, j.correct, None if j.correct else j.judgment) for j in judged]
    if arm == "sft":
        return [record(j, j.response, True, None) for j in judged]
    if arm == "sft_correct":
        return [record(j, j.response, True, None) for j in judged if j.correct]
    seen, out = set(), []  # sft_reference: one reference per problem, in the order of the responses
    for j in judged:
        if j.problem not in seen:
            seen.add(j.problem)
            out.append(record(j, task.reference_response(problems[j.problem]), True, None))
    return out


# ------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class FitSettings:
    """One arm's training: ``steps`` AdamW steps at ``lr`` on batches of ``batch_size`` records in
    an order drawn from ``seed`` (which also draws the LoRA adapter's initialisation)."""

    steps: int
    lr: float
    batch_size: int = 4
    seed: int = 0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    max_length: int = 512


def fit_arm(model, tokenizer, records: Sequence[NLFTRecord], arm: str, settings: FitSettings, progress: bool = False):
    """A LoRA-trained copy of ``model`` (merged, eval mode) and its per-step losses.

    ``arm`` ``nlft``: the NLFT loss (:func:`nlft_kernels.training.nlft_step`); any ``sft*`` arm:
    the token-mean cross-entropy of the base view. Every arm with the same ``settings`` gets the
    same adapter initialisation and the same batch order (positions in ``records``)."""
    from tqdm.auto import tqdm

    from nlft_kernels.training import NLFTCollator, add_lora, encode_records, nlft_step

    features = encode_records(records, tokenizer, max_length=settings.max_length)
    if not features:
        raise ValueError(f"{arm}: no record fits max_length={settings.max_length}")
    pad = next((v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if v is not None), 0)
    collate = NLFTCollator(int(pad))
    torch.manual_seed(settings.seed)  # the same adapter initialisation in every arm
    trained = add_lora(copy.deepcopy(model), settings.lora_r, settings.lora_alpha, settings.lora_dropout)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    rng = random.Random(settings.seed)
    order: list[int] = []
    losses = []
    trained.train()
    for _ in tqdm(range(settings.steps), desc=f"{arm} train", disable=not progress):
        picked = []
        while len(picked) < min(settings.batch_size, len(features)):
            if not order:
                order = list(range(len(features)))
                rng.shuffle(order)
            picked.append(features[order.pop()])
        batch = collate(picked)
        loss = nlft_step(trained, batch, pad_token_id=int(pad)) if arm == "nlft" else sft_loss(trained, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    trained = trained.merge_and_unload()  # evaluation decodes faster without the adapter's extra matmuls
    trained.eval()
    return trained, losses


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the response tokens under the base view (transformers' own loss: the
    label of position ``p`` is the token at ``p + 1``)."""
    ids, mask, rows, labels = (batch[k] for k in ("base_input_ids", "base_attention_mask", "base_rows", "labels"))
    targets = torch.full_like(ids, -100)
    keep = labels != -100
    b, r = keep.nonzero(as_tuple=True)
    targets[b, rows[b, r] + 1] = labels[b, r]
    return model(input_ids=ids, attention_mask=mask, labels=targets).loss
