"""The inputs and the optimizer step of each method that bench_train_step compares.

Every method trains the same model on the same questions with the same number of tokens:
a prompt of exactly ``prompt_tokens`` tokens and a response of exactly ``response_tokens``
(the teacher views of NLFT add ``teacher_tokens`` of standard answer or judgment to their
prompt). Exact lengths keep the comparison about the methods, not about padding: prompts
are the package's prompt views (``nlft_kernels.training.data.DEFAULT_TEMPLATES``) left-filled with
earlier GSM8K exemplars or cut from the left to length, responses are the reference solution
(or, for a wrong sample, that solution with a wrong final answer, judged by
``nlft_kernels.recipes.rule_judge``) repeated and cut; ``nlft_kernels.training.data.NLFTCollator`` batches them.

  sft                 cross-entropy on the response, the Hugging Face way (``labels=``)
  nlft_authors_style  the three views in one batch of 3B sequences, all with gradient, the
                      loss of ``benchmarks.authors_style`` (float32 softmaxes, Python clusters)
  nlft_kernels        ``nlft_kernels.training.nlft_step``: the fused linear loss on the base
                      view's hidden states, teacher views without gradient, logits never
                      materialised
  reft                ``benchmarks.reft``: ReFT's PPO iteration as its code runs it: sampling
                      (ReFT's own prompt at natural length, EOS-terminated, capped), reward,
                      reference and old-policy forwards, GAE, whitening, two PPO epochs with
                      gradient clipping
  reft_no_sampling    the same iteration on responses sampled once before the timed calls:
                      ReFT's training cost without its sampling

Every cost counted: ``<nlft method>_gen_judge`` adds to the NLFT step one generation pass (one
response per question, with ReFT's sampler: its prompt, temperature 1, EOS, the same cap) and one
judging pass (``judge``: the rule judge ``nlft_kernels.recipes.rule_judge.judge_response`` by default, or any
``module:function`` that ``nlft_kernels.recipes.judging.load_judge`` loads, e.g. an LLM judge); the NLFT step
itself then trains on the benchmark's fixed batch, so its tokens equal the other NLFT rows'.

The paper's setting (``bench_train_step --setting paper``) trains the two NLFT methods with LoRA
instead (``nlft_kernels_lora``, ``nlft_authors_style_lora``: the same steps on a peft model whose
only trainable weights are the adapters of ``PAPER_LORA``) against ``reft`` as ReFT trains (full
fine-tuning of the policy, a frozen reference copy, a value head). ``row_includes`` says what each
method's row contains.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from benchmarks.authors_style import authors_style_loss
from nlft_kernels import NLFTConfig
from nlft_kernels.recipes.rule_judge import judge_response
from nlft_kernels.training import nlft_step
from nlft_kernels.training.data import DEFAULT_TEMPLATES, VIEWS, NLFTCollator, NLFTRecord

GEN_JUDGE = "_gen_judge"  # suffix: the NLFT method plus one generation and one judging pass per sample
METHODS = (
    "sft",
    "nlft_authors_style",
    "nlft_kernels",
    "nlft_authors_style_gen_judge",
    "nlft_kernels_gen_judge",
    "reft_no_sampling",
    "reft",
)
# The paper's comparison: NLFT with LoRA against ReFT with full fine-tuning.
PAPER_METHODS = (
    "nlft_authors_style_lora",
    "nlft_kernels_lora",
    "nlft_authors_style_lora_gen_judge",
    "nlft_kernels_lora_gen_judge",
    "reft_no_sampling",
    "reft",
)
ALL_METHODS = tuple(dict.fromkeys(METHODS + PAPER_METHODS))
REFT_METHODS = ("reft", "reft_no_sampling")


@dataclass(frozen=True)
class LoRASettings:
    """The adapter of the paper's setting, as the authors' training scripts configure peft:
    ``LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=["gate_proj", "down_proj",
    "up_proj"], bias="none")`` on Llama-3-8B loaded in 8-bit (the paper: LoRA r = 16 on the
    gate/up/down projections). lora_alpha only scales the adapter's output, so it changes no cost;
    16 is the authors' value (and ``nlft_kernels.training.add_lora``'s default)."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


PAPER_LORA = LoRASettings()

FINAL_ANSWER = re.compile(r"####\s*(-?[\d,.]+)")


@dataclass
class StepInputs:
    """One batch of B questions, identical for every method.

    ``nlft_batch`` has the collator's layout: per view ``{v}_input_ids`` / ``{v}_attention_mask``
    [B, L_v] and ``{v}_rows`` [B, R] (row r of view v's logits predicts ``labels[:, r]``), plus
    ``labels`` [B, R] and ``correct`` [B]. ``prompt_ids`` [B, P] is the base prompt, which SFT
    and ReFT also use; ``response_ids`` [B, R] the response; ``answers`` the reference final answers.
    """

    nlft_batch: dict[str, torch.Tensor]
    prompt_ids: torch.Tensor
    response_ids: torch.Tensor
    answers: list[str] = field(default_factory=list)
    # ReFT's prompt (``benchmarks.reft.REFT_PROMPT``) at natural length, left-padded [B, P_reft],
    # its attention mask, and what the judge of the generation pass reads.
    reft_prompt_ids: torch.Tensor | None = None
    reft_prompt_mask: torch.Tensor | None = None
    questions: list[str] = field(default_factory=list)
    solutions: list[str] = field(default_factory=list)
    eos_token_id: int | None = None

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device: torch.device) -> StepInputs:
        return StepInputs(
            {k: v.to(device) for k, v in self.nlft_batch.items()},
            self.prompt_ids.to(device),
            self.response_ids.to(device),
            list(self.answers),
            None if self.reft_prompt_ids is None else self.reft_prompt_ids.to(device),
            None if self.reft_prompt_mask is None else self.reft_prompt_mask.to(device),
            list(self.questions),
            list(self.solutions),
            self.eos_token_id,
        )

    @property
    def reft_prompt_tokens(self) -> list[int]:
        """Each question's ReFT prompt length (tokens, padding excluded)."""
        return self.reft_prompt_mask.sum(1).tolist()


def _wrong_solution(solution: str) -> str:
    """The solution with its final answer changed: a wrong response of realistic length."""
    match = FINAL_ANSWER.search(solution)
    if not match:
        return solution + "\n#### 0"
    value = match.group(1).replace(",", "")
    try:
        wrong = str(float(value) + 1).removesuffix(".0")
    except ValueError:
        wrong = "0"
    return solution[: match.start(1)] + wrong


def _exact(tokens: list[int], filler: list[int], n: int, keep: str) -> list[int]:
    """Exactly ``n`` tokens: ``tokens`` cut to n (keeping its ``keep`` = "end" or "start"), or
    filled with ``filler`` on the other side when too short."""
    if not filler and len(tokens) < n:
        raise ValueError("no filler tokens to reach the requested length")
    if keep == "end":
        while len(tokens) < n:
            tokens = filler + tokens
        return tokens[-n:]
    while len(tokens) < n:
        tokens = tokens + filler
    return tokens[:n]


def build_inputs(
    rows: list[dict],
    tokenizer,
    vocab_size: int,
    batch_size: int,
    prompt_tokens: int,
    response_tokens: int,
    teacher_tokens: int,
    wrong_every: int = 2,
    reft_max_input_length: int = 300,
) -> StepInputs:
    """A batch from GSM8K rows (question, answer): sample ``b`` is wrong when ``b % wrong_every
    == wrong_every - 1`` (half the batch by default), so the wrong-response branch of NLFT runs.

    ``tokenizer``: a Hugging Face tokenizer (``tokenizer(text, add_special_tokens=False)``);
    ids are taken modulo ``vocab_size`` for models smaller than the tokenizer. The rows after
    the first ``batch_size`` are the exemplars that fill prompts. The base prompt has exactly
    ``prompt_tokens`` tokens, the teacher prompts ``prompt_tokens + teacher_tokens``. ReFT's
    prompts are its template at natural length, cut to ``reft_max_input_length`` as ReFT cuts
    them (keeping the start), left-padded with 0 to the longest.
    """
    from benchmarks.reft import REFT_PROMPT

    if len(rows) < batch_size + 1:
        raise ValueError(f"need at least {batch_size + 1} rows, got {len(rows)}")

    def encode(text: str) -> list[int]:
        return [t % vocab_size for t in tokenizer(text, add_special_tokens=False)["input_ids"]]

    exemplars = [t for r in rows[batch_size:] for t in encode(r["question"] + "\n" + r["answer"] + "\n\n")]
    prompt_length = {
        "base": prompt_tokens,
        "standard": prompt_tokens + teacher_tokens,
        "judge": prompt_tokens + teacher_tokens,
    }
    features, answers = [], []
    for b, row in enumerate(rows[:batch_size]):
        question, solution = row["question"], row["answer"]
        correct = b % wrong_every != wrong_every - 1
        response = solution if correct else _wrong_solution(solution)
        judgment = None
        if not correct:  # the judge view of a wrong sample quotes what is wrong with it
            judgment = judge_response(question, response, solution).judgment or "The final answer is wrong."
        record = NLFTRecord(question, response, solution, judgment, correct)
        match = FINAL_ANSWER.search(solution)
        answers.append(match.group(1) if match else "")
        body = encode(response)
        labels = _exact(body, body, response_tokens, "start")
        feature: dict = {"labels": labels, "correct": correct}
        for view in VIEWS:
            prompt = _exact(
                encode(DEFAULT_TEMPLATES.render(view, record, tokenizer)), exemplars, prompt_length[view], "end"
            )
            feature[f"{view}_input_ids"] = prompt + labels
            feature[f"{view}_prompt_length"] = len(prompt)
        features.append(feature)
    batch = NLFTCollator(pad_token_id=0)(features)
    prompts = batch["base_input_ids"][:, :prompt_tokens].clone()
    reft = [
        encode(REFT_PROMPT.format(question=r["question"].strip()))[:reft_max_input_length] for r in rows[:batch_size]
    ]
    width = max(map(len, reft))
    reft_ids = torch.tensor([[0] * (width - len(p)) + p for p in reft])
    reft_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in reft])
    eos = getattr(tokenizer, "eos_token_id", None)
    return StepInputs(
        batch,
        prompts,
        batch["labels"].clone(),
        answers,
        reft_ids,
        reft_mask,
        [r["question"] for r in rows[:batch_size]],
        [r["answer"] for r in rows[:batch_size]],
        None if eos is None else eos % vocab_size,
    )


def _gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], rows [B, R] -> [B, R, D]."""
    return x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


def make_optimizer(params, lr: float = 1e-6) -> torch.optim.Optimizer:
    """AdamW for every method, so optimizer state costs the same (plus ReFT's value head)."""
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr)


StepFn = Callable[[], dict[str, float]]


def sft_step(model, optimizer, inputs: StepInputs) -> StepFn:
    """SFT: prompt + response in one sequence, cross-entropy on the response tokens only."""
    ids = torch.cat([inputs.prompt_ids, inputs.response_ids], dim=1)
    labels = ids.clone()
    labels[:, : inputs.prompt_ids.shape[1]] = -100

    def step() -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    return step


def authors_style_step(model, optimizer, inputs: StepInputs, config: NLFTConfig) -> StepFn:
    """NLFT as the authors' code runs it: the three views padded (right) into one batch of 3B
    sequences, one forward with gradient and all hidden states, the loss on [3, B, R, V] logits."""
    batch = inputs.nlft_batch
    length = max(batch[f"{v}_input_ids"].shape[1] for v in VIEWS)
    pad = [length - batch[f"{v}_input_ids"].shape[1] for v in VIEWS]
    ids = torch.cat([F.pad(batch[f"{v}_input_ids"], (0, p)) for v, p in zip(VIEWS, pad, strict=True)])
    mask = torch.cat([F.pad(batch[f"{v}_attention_mask"], (0, p)) for v, p in zip(VIEWS, pad, strict=True)])
    rows = torch.cat([batch[f"{v}_rows"] for v in VIEWS])
    b = inputs.batch_size

    def step() -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        logits = _gather_rows(out.logits, rows)
        views = logits.view(3, b, *logits.shape[1:])
        hidden = _gather_rows(out.hidden_states[-1][:b], batch["base_rows"])
        loss = authors_style_loss(views, batch["labels"], batch["correct"], config, hidden_states=hidden)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    return step


def nlft_kernels_step(model, optimizer, inputs: StepInputs, config: NLFTConfig) -> StepFn:
    """NLFT with nlft_kernels: the package's ``nlft_step`` (loss, backward, optimizer step)."""
    batch = inputs.nlft_batch

    def step() -> dict[str, float]:
        return {"loss": nlft_step(model, batch, config, optimizer=optimizer).item()}

    return step


def add_paper_lora(model, lora: LoRASettings = PAPER_LORA):
    """``model`` as a peft model with ``lora``'s adapters (the base weights frozen, in place)."""
    from nlft_kernels.training import add_lora

    return add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=list(lora.targets))


def row_includes(method: str, lora: LoRASettings = PAPER_LORA, judge: str = "builtin") -> dict:
    """What one step of ``method`` trains and what its time and memory contain, for the results.
    ``judge``: the judge of the generation pass (``nlft_kernels.recipes.judging.load_judge``'s spec)."""
    views = {
        "sft": "one sequence (prompt + reference response), with gradient",
        "reft": "the sampled response after ReFT's prompt, no teacher views",
    }
    nlft_views = {
        "nlft_kernels": "base view with gradient; standard and judge views without gradient (nlft_step)",
        "nlft_authors_style": "base, standard and judge views in one batch, all with gradient",
    }
    counted = method.endswith(GEN_JUDGE)
    base = method.removesuffix(GEN_JUDGE).removesuffix("_lora")
    is_reft = base in REFT_METHODS
    lora_method = method.removesuffix(GEN_JUDGE).endswith("_lora")
    trained = (
        f"LoRA r={lora.r}, alpha {lora.alpha}, dropout {lora.dropout} on {'/'.join(lora.targets)}; base weights frozen"
        if lora_method
        else "full fine-tuning (every weight of the model)"
    )
    sampler = "ReFT's sampler (its prompt, temperature 1, EOS-terminated, capped at reft_max_length tokens)"
    if method == "reft":
        sampling = "included (one response per question, also reported apart)"
        generation = f"included: one sampled response per question, {sampler}"
    elif method == "reft_no_sampling":
        sampling = "excluded (responses sampled once before the timed steps and reused)"
        generation = "excluded"
    elif counted:
        sampling = "included (one response per question, also reported apart)"
        generation = f"included: one generated response per question, {sampler}; NLFT then trains on the fixed batch"
    else:
        sampling = "none"
        generation = "none (the response is given)"
    builtin = judge in (None, "", "builtin")
    judge_name = "the rule judge nlft_kernels.recipes.rule_judge.judge_response" if builtin else judge
    if is_reft:
        judging = "ReFT's reward: the final answer checked against the reference (nlft_kernels.recipes.rule_judge)"
    elif counted:
        judging = f"included: one judgment per response by {judge_name}"
    else:
        judging = "none (the judgment is given)" if base.startswith("nlft") else "none"
    return {
        "trained": trained,
        "frozen_reference": is_reft,
        "value_head": is_reft,
        "sampling": sampling,
        "generation": generation,
        "judging": judging,
        "gradient_clipping": "1.0 (ReFT's clip_grad_norm)" if is_reft else "none",
        "views": views.get("reft" if is_reft else base) or nlft_views[base],
        "lora": asdict(lora) if lora_method else None,
    }


def generation_judging_pass(
    model, inputs: StepInputs, decode: Callable[[list[int]], str], judge: Callable, max_length: int, temperature: float
) -> StepFn:
    """One response per question with ReFT's sampler and one judgment of each: what NLFT pays
    to get the responses and judgments its step trains on. Returns sampling_ms, judging_ms and
    the mean number of generated tokens."""
    from benchmarks.reft import response_mask, sample_responses

    def run() -> dict[str, float]:
        device = inputs.reft_prompt_ids.device
        _sync(device)
        start = time.perf_counter()
        sequences = sample_responses(
            model, inputs.reft_prompt_ids, inputs.reft_prompt_mask, inputs.eos_token_id, max_length, temperature
        )
        _sync(device)
        sampled = time.perf_counter()
        responses = sequences[:, inputs.reft_prompt_ids.shape[1] :]
        lengths = response_mask(responses, inputs.eos_token_id).sum(1).long().tolist()
        texts = [decode(r[:n].tolist()) for r, n in zip(responses, lengths, strict=True)]
        judgments = [judge(q, t, a) for q, t, a in zip(inputs.questions, texts, inputs.solutions, strict=True)]
        judged = time.perf_counter()
        return {
            "sampling_ms": (sampled - start) * 1e3,
            "judging_ms": (judged - sampled) * 1e3,
            "generated_tokens": sum(lengths) / len(lengths),
            "judged_correct": sum(bool(j.correct) for j in judgments) / len(judgments),
        }

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(
    method: str,
    model,
    inputs: StepInputs,
    decode: Callable[[list[int]], str],
    config: NLFTConfig = NLFTConfig(),
    lr: float = 1e-6,
    lora: LoRASettings = PAPER_LORA,
    reft_config=None,
    judge: str | None = None,
) -> tuple[StepFn, list[torch.nn.Module]]:
    """(step, trained modules) of ``method``; ReFT also builds its frozen reference model and value
    head (the step's ``trainer`` attribute holds them); a ``*_lora`` method wraps ``model`` in
    ``lora``'s adapters first (the trained module is then the peft model); a ``*_gen_judge`` method
    runs ``generation_judging_pass`` before the step (``judge``: a ``load_judge`` spec).
    ``reft_config``: ReFT's settings (default ``ReFTConfig()``), whose sampler the generation
    pass shares."""
    from benchmarks.reft import ReFTConfig, ReFTTrainer, ValueHead

    reft_config = reft_config or ReFTConfig()
    if method in REFT_METHODS:
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        head = ValueHead(model.config.hidden_size).to(next(model.parameters()))
        optimizer = make_optimizer([*model.parameters(), *head.parameters()], lr)
        trainer = ReFTTrainer(model, head, reference, optimizer, decode, reft_config, inputs.eos_token_id)
        # Sampled once here, outside the timed calls, for the step without sampling.
        fixed = (
            trainer.sample(inputs.reft_prompt_ids, inputs.reft_prompt_mask) if method == "reft_no_sampling" else None
        )

        def reft_step() -> dict[str, float]:
            return trainer.step(inputs.reft_prompt_ids, inputs.answers, inputs.reft_prompt_mask, sequences=fixed)

        reft_step.trainer = trainer
        return reft_step, [model, head]
    if method not in ALL_METHODS:
        raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}")
    counted = method.endswith(GEN_JUDGE)
    method = method.removesuffix(GEN_JUDGE)
    if method.endswith("_lora"):
        model = add_paper_lora(model, lora)
        method = method.removesuffix("_lora")
    optimizer = make_optimizer(model.parameters(), lr)
    if method == "sft":
        step = sft_step(model, optimizer, inputs)
    elif method == "nlft_authors_style":
        step = authors_style_step(model, optimizer, inputs, config)
    else:
        step = nlft_kernels_step(model, optimizer, inputs, config)
    if not counted:
        return step, [model]
    from nlft_kernels.recipes.judging import load_judge

    before = generation_judging_pass(
        model, inputs, decode, load_judge(judge), reft_config.max_length, reft_config.temperature
    )

    def counted_step() -> dict[str, float]:
        return before() | step()

    return counted_step, [model]
