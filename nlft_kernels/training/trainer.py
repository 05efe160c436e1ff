"""NLFT on a transformers causal LM: the per-batch loss, a plain-loop step, a Trainer, ``train``.

One code path computes the loss of a batch from :class:`nlft_kernels.training.data.NLFTCollator`
(:func:`nlft_batch_loss`); :func:`nlft_step` and :meth:`NLFTTrainer.compute_loss` both call it.

Per batch: the base view runs through the model with gradient and the standard and judge views
under ``torch.no_grad`` (their activations are freed at once); only the final hidden states are
taken (a forward hook on the decoder; ``logits_to_keep=1`` spares the full logits), the rows that
predict the response tokens are gathered (row ``r`` of every view predicts ``labels[:, r]``), the
teachers' label log-probs come from :func:`nlft_kernels.linear_token_logprobs` and the loss from
:func:`nlft_kernels.nlft_linear_loss`: no [N, V] logits tensor exists in any view. The judge
view runs only for the batch's wrong samples. With ``judge_nll_weight > 0`` it runs with
gradient, batched with the base view into one forward (so that DDP sees one forward per step).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import tempfile
from collections.abc import Sequence

import torch
import transformers
from torch import nn

from nlft_kernels import linear_token_logprobs, nlft_linear_loss
from nlft_kernels.config import NLFTConfig
from nlft_kernels.training.arguments import CHECKPOINTING_FIELD, NLFTTrainingArguments, training_arguments
from nlft_kernels.training.data import (
    DEFAULT_TEMPLATES,
    VIEWS,
    NLFTCollator,
    NLFTRecord,
    PromptTemplates,
    encode_records,
)
from nlft_kernels.training.distributed import sharded_batch_loss, sharding_of

# Every key that encode_record writes: the Trainer must not drop them as "unused columns".
FEATURE_COLUMNS = ["labels", "correct"] + [f"{v}_{k}" for v in VIEWS for k in ("input_ids", "prompt_length")]
# Rows per chunk of the judge-view NLL: logits chunks of about this many bytes (float32).
_JUDGE_NLL_CHUNK_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------
# Reaching into wrapped models.


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without DDP/DataParallel, FSDP1 and DeepSpeed engine (``.module``) and torch.compile
    (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model`` (through DDP, torch.compile and peft wrappers;
    a peft model's LoRA layers stay in place and active)."""
    model = unwrap_model(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def lm_head_of(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, D], bias [V] or None) of the model's output embedding (tied or not)."""
    head = causal_lm(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(causal_lm(model)).__name__} has no output embeddings (LM head)")
    if hasattr(head, "base_layer"):
        raise ValueError("an adapter on the LM head is not supported: leave lm_head out of the LoRA target modules")
    weight = head.weight
    config = getattr(causal_lm(model), "config", None)
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None) not in (None, 1.0):
            raise ValueError(f"models with {name} are not supported: their logits are not hidden @ lm_head.weight.T")
    return weight, getattr(head, "bias", None)


def _accepts(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


@contextlib.contextmanager
def decoder_states(model: nn.Module):
    """Yields ``(captured, kwargs)``: while open, every call of ``model``'s decoder appends its
    final hidden states [B, L, D] to ``captured``; pass ``kwargs`` to the model's call
    (``logits_to_keep=1`` where the model accepts it keeps the head to one position)."""
    lm = causal_lm(model)
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = lm.get_decoder().register_forward_hook(hook)
    try:
        yield captured, ({"logits_to_keep": 1} if _accepts(lm, "logits_to_keep") else {})
    finally:
        handle.remove()


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states [B, L, D] (what the LM head reads) of ``model`` on a batch.

    The call goes through ``model`` itself (so DDP and peft hooks run); the states are taken
    by a forward hook on the decoder (:func:`decoder_states`).
    """
    with decoder_states(model) as (captured, kwargs):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder call per forward, saw {len(captured)}")
    return captured[0]


def _gather_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, R, D] rows ``rows`` [B, R] of ``hidden`` [B, L, D]."""
    return hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def _pad_cat(tensors: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """Right-pad [b_i, L_i] tensors to the longest L and stack them along the batch."""
    length = max(t.shape[1] for t in tensors)
    return torch.cat([nn.functional.pad(t, (0, length - t.shape[1]), value=value) for t in tensors])


def _trim(ids: torch.Tensor, mask: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the all-padding columns at the right of a sub-batch (``length``: its longest row,
    when known on the host)."""
    if length is None:
        length = int(mask.sum(1).max())
    return ids[:, :length], mask[:, :length]


def _host_plan(batch: dict[str, torch.Tensor]) -> tuple[list[int], int, int]:
    """(wrong samples, longest standard prompt + response, longest judge one among the wrong
    samples) of a batch, in one read: no host sync while the batch is still on the host (as
    the collator leaves it), one otherwise (the Trainer moves batches to the device first)."""
    correct = batch["correct"].bool()
    lengths = torch.stack(
        [correct.long(), batch["standard_attention_mask"].sum(1), batch["judge_attention_mask"].sum(1)]
    ).tolist()
    wrong = [b for b, ok in enumerate(lengths[0]) if not ok]
    return wrong, max(lengths[1]), max((lengths[2][b] for b in wrong), default=0)


def _match_dtypes(hidden, weight, bias):
    """Inside autocast: both in the autocast dtype (as F.linear would); else hidden in weight's dtype."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _chunk_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore):
    logits = nn.functional.linear(hidden, weight, bias).float()
    return nn.functional.cross_entropy(logits, labels, ignore_index=ignore, reduction="none")


def judge_nll(hidden, weight, bias, labels, ignore_index: int = -100) -> torch.Tensor:
    """Per-sample mean ``-log p(label)`` [B] of ``hidden`` [B, R, D] rows under the LM head, with
    gradient; chunked over rows and recomputed in backward (checkpointing), so that at most one
    [chunk, V] logits chunk is alive."""
    flat, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    rows = max(1, _JUDGE_NLL_CHUNK_BYTES // (4 * weight.shape[0]))
    parts = [
        torch.utils.checkpoint.checkpoint(
            _chunk_nll, flat[i : i + rows], weight, bias, flat_labels[i : i + rows], ignore_index, use_reentrant=False
        )
        for i in range(0, flat.shape[0], rows)
    ]
    nll = torch.cat(parts).view(labels.shape)
    return nll.sum(1) / (labels != ignore_index).sum(1).clamp(min=1)


# ---------------------------------------------------------------------------------------------
# The loss of one batch.


def nlft_batch_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    config: NLFTConfig = NLFTConfig(),
    *,
    judge_nll_weight: float = 0.0,
    lm_head: nn.Module | None = None,
    pad_token_id: int = 0,
    validate: bool = True,
) -> torch.Tensor:
    """The NLFT loss (a scalar with gradient) of ``batch`` (from :class:`NLFTCollator`).

    ``sample_mean`` reduction: the spec's mean over samples of
    ``loss_scale * (sum_t token_loss + nll_weight * sum_t NLL_t) / n``; with
    ``judge_nll_weight > 0``, each wrong sample adds ``judge_nll_weight * mean_t(-log p_j)``
    (judge view, aligned rows, with gradient) before the mean over the B samples;
    ``judge_nll_weight=10`` reproduces the authors' scale of that term (they add it inside the
    loss that ``loss_scale = 10`` multiplies), 0 leaves the judge view a pure teacher.
    ``lm_head``: the module whose weight [V, D] (and bias) map final hidden states to logits;
    default: the model's output embeddings. ``validate``: the ops' input checks (label range,
    finite log-probs and logits): 15 of the step's 28 host syncs at batch 4 (see
    ``tests/training/test_host_syncs.py``); off, a NaN shows as a NaN loss instead of an error.

    A model whose parameters are sharded (FSDP2 ``fully_shard``, FSDP1, DeepSpeed ZeRO-3)
    takes :func:`nlft_kernels.training.distributed.sharded_batch_loss`: the same loss, computed
    inside the head's forward, with the same forwards on every rank.
    """
    if judge_nll_weight < 0 or not math.isfinite(judge_nll_weight):
        raise ValueError(f"judge_nll_weight must be a finite number >= 0, got {judge_nll_weight}")
    if lm_head is None:
        weight, bias = lm_head_of(model)
    else:
        weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    plan = _host_plan(batch)
    batch = {k: v.to(weight.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if sharding_of(model) is not None:
        # FSDP / ZeRO-3: the head's weight is whole only inside its forward (see .distributed).
        head = lm_head if lm_head is not None else causal_lm(model).get_output_embeddings()
        return sharded_batch_loss(
            model, batch, config, judge_nll_weight=judge_nll_weight, head=head, pad_token_id=pad_token_id
        )
    labels, correct = batch["labels"], batch["correct"].bool()
    wrong_list, standard_length, judge_length = plan
    wrong = torch.tensor(wrong_list, dtype=torch.int64).to(labels.device, non_blocking=True)
    judge_grad = judge_nll_weight > 0 and wrong.numel() > 0
    ids, mask = batch["base_input_ids"], batch["base_attention_mask"]
    batch_size = ids.shape[0]
    if judge_grad:
        # One forward for base + wrong judge rows: DDP allows a single forward per backward.
        j_ids, j_mask = _trim(batch["judge_input_ids"][wrong], batch["judge_attention_mask"][wrong], judge_length)
        hidden = final_hidden(model, _pad_cat([ids, j_ids], pad_token_id), _pad_cat([mask, j_mask], 0))
        base_hidden = _gather_rows(hidden[:batch_size], batch["base_rows"])
        judge_hidden = _gather_rows(hidden[batch_size:], batch["judge_rows"][wrong])
    else:
        base_hidden = _gather_rows(final_hidden(model, ids, mask), batch["base_rows"])
    base_hidden, w, b = _match_dtypes(base_hidden, weight, bias)

    teacher = unwrap_model(model)  # no_grad views bypass DDP: no collective for them
    with torch.no_grad():
        standard = _teacher_logprobs(teacher, batch, "standard", None, labels, w, b, config, standard_length, validate)
        judge = None
        if wrong.numel() > 0:
            judge = torch.zeros_like(standard)
            if judge_grad:
                h, jw, jb = _match_dtypes(judge_hidden.detach(), weight, bias)
                judge[wrong] = linear_token_logprobs(
                    h, jw, labels[wrong], jb, ignore_index=config.ignore_index, validate=validate
                )
            else:
                judge[wrong] = _teacher_logprobs(
                    teacher, batch, "judge", wrong, labels[wrong], w, b, config, judge_length, validate
                )
    loss = nlft_linear_loss(
        base_hidden, w, labels, correct, standard=standard, judge=judge, bias=b, config=config, validate=validate
    )
    if judge_grad:
        h, jw, jb = _match_dtypes(judge_hidden, weight, bias)
        loss = loss + judge_nll_weight * judge_nll(h, jw, jb, labels[wrong], config.ignore_index).sum() / batch_size
    return loss


def _teacher_logprobs(
    model, batch, view, index, labels, weight, bias, config, length=None, validate=True
) -> torch.Tensor:
    """[b, R] float32 label log-probs of teacher ``view`` (samples ``index``, or all), no
    gradient; ``length``: the longest of those rows (``_host_plan``)."""
    ids, mask, rows = (batch[f"{view}_{k}"] for k in ("input_ids", "attention_mask", "rows"))
    if index is not None:
        ids, mask, rows = ids[index], mask[index], rows[index]
    ids, mask = _trim(ids, mask, length)
    hidden = _gather_rows(final_hidden(model, ids, mask), rows)
    hidden, weight, bias = _match_dtypes(hidden, weight, bias)
    return linear_token_logprobs(hidden, weight, labels, bias, ignore_index=config.ignore_index, validate=validate)


def nlft_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    config: NLFTConfig = NLFTConfig(),
    *,
    judge_nll_weight: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    lm_head: nn.Module | None = None,
    pad_token_id: int = 0,
    validate: bool = True,
) -> torch.Tensor:
    """One NLFT step for users with their own loop: the loss of ``batch`` (see
    :func:`nlft_batch_loss`). Without ``optimizer`` it returns the loss with its graph (call
    ``backward`` yourself, e.g. scaled for accumulation); with one, it also runs backward,
    ``optimizer.step()`` and ``optimizer.zero_grad()`` and returns the detached loss."""
    loss = nlft_batch_loss(
        model,
        batch,
        config,
        judge_nll_weight=judge_nll_weight,
        lm_head=lm_head,
        pad_token_id=pad_token_id,
        validate=validate,
    )
    if optimizer is None:
        return loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ---------------------------------------------------------------------------------------------
# transformers.Trainer


class NLFTTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose loss is :func:`nlft_batch_loss` (the code of :func:`nlft_step`).

    Train on the output of :func:`nlft_kernels.training.data.encode_records` (a list of dicts or a
    ``datasets.Dataset``); the default collator is :class:`NLFTCollator` with the tokenizer's
    pad token. Gradient accumulation divides each micro-batch's sample-mean loss by the number
    of micro-batches (exact for equal micro-batches); bf16/fp16 autocast, peft LoRA models and
    DDP (torchrun / accelerate launch) work as with any Trainer.

    nlft_config: the objective's constants; judge_nll_weight: see :func:`nlft_batch_loss`.
    """

    def __init__(self, *args, nlft_config: NLFTConfig = NLFTConfig(), judge_nll_weight: float = 0.0, **kwargs):
        tokenizer = kwargs.get("processing_class")
        self.pad_token_id = _pad_id(tokenizer) if tokenizer is not None else 0
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = NLFTCollator(self.pad_token_id, nlft_config.ignore_index)
        super().__init__(*args, **kwargs)
        self.nlft_config = nlft_config
        self.judge_nll_weight = judge_nll_weight
        # The loss is a per-sample mean: let the Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(FEATURE_COLUMNS)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The NLFT loss of one (micro-)batch; ``num_items_in_batch`` is not used (sample mean)."""
        loss = nlft_batch_loss(
            model,
            inputs,
            self.nlft_config,
            judge_nll_weight=self.judge_nll_weight,
            pad_token_id=self.pad_token_id,
        )
        return (loss, {"loss": loss}) if return_outputs else loss


def _pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked out either way)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


# ---------------------------------------------------------------------------------------------
# train(): NLFTTrainer on NLFTTrainingArguments, with the model prepared (8-bit, checkpointing, LoRA).

DEFAULT_LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")  # the authors' choice for Llama


def add_lora(
    model: nn.Module, r: int = 16, alpha: int = 16, dropout: float = 0.05, targets: Sequence[str] | None = None
) -> nn.Module:
    """``model`` wrapped in a peft LoRA adapter on ``targets`` (default: the MLP projections
    gate/up/down when the model has them, as the authors, else peft's default for the architecture)."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if targets is None:
        targets = [t for t in DEFAULT_LORA_TARGETS if t in names] or None
    else:
        targets = list(targets)
        unknown = [t for t in targets if t not in names]
        if unknown:  # peft's own error lists every module; name the ones asked for instead
            raise ValueError(f"LoRA targets {unknown} are not modules of {type(model).__name__}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def steps_for_epochs(n_records: int, epochs: float, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps that show every record ``epochs`` times (the last step may be partial)."""
    return max(1, math.ceil(n_records * epochs / (batch_size * grad_accum)))


def train(
    model: nn.Module,
    tokenizer,
    records: Sequence[NLFTRecord],
    args: NLFTTrainingArguments | None = None,
    *,
    config: NLFTConfig = NLFTConfig(),
    templates: PromptTemplates = DEFAULT_TEMPLATES,
    steps: int | None = None,
    epochs: float | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    lr: float | None = None,
    lr_scheduler: str | None = None,
    warmup_ratio: float | None = None,
    lora: bool | None = None,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float | None = None,
    lora_targets: Sequence[str] | None = None,
    gradient_checkpointing: bool | None = None,
    output_dir: str | os.PathLike | None = None,
    seed: int | None = None,
    max_length: int | None = None,
    judge_nll_weight: float | None = None,
    progress: bool = True,
) -> nn.Module:
    """NLFT-train ``model`` on ``records`` with :class:`NLFTTrainer`; returns the trained model (a
    peft model when ``args.lora``), in eval mode.

    The settings are ``args`` (:class:`NLFTTrainingArguments`), or the keywords, which set its
    fields (:data:`nlft_kernels.training.arguments.TRAIN_KEYWORDS`; left out: the field's
    default): ``steps`` optimizer steps or ``epochs`` passes over the records (the last step may
    be partial), each of ``grad_accum`` micro-batches of ``batch_size`` records in a seeded
    shuffled order, the Trainer's AdamW at ``lr`` with ``lr_scheduler`` (constant, linear or
    cosine decay after ``warmup_ratio`` of the steps of linear warm-up); a tqdm bar unless
    ``progress`` is False. Before the Trainer runs, the model is prepared here: a model loaded in
    8 bits (bitsandbytes) through peft's ``prepare_model_for_kbit_training`` (it trains through
    LoRA only), ``gradient_checkpointing`` (non-reentrant) on the base view, then the LoRA adapter
    (rank ``lora_r``, ``lora_alpha``, ``lora_dropout`` on ``lora_targets``, by default the
    gate/up/down projections). With ``output_dir``, the adapter (LoRA) or the full model and the
    tokenizer are saved there at the end; no checkpoint folder is written unless
    ``args.save_strategy`` asks for one, and no folder at all without ``output_dir``.
    """
    keywords = dict(
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, lr_scheduler=lr_scheduler, warmup_ratio=warmup_ratio,
        lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
        gradient_checkpointing=gradient_checkpointing, output_dir=output_dir, seed=seed, max_length=max_length,
        judge_nll_weight=judge_nll_weight,
    )  # fmt: skip
    if args is None:
        args = training_arguments(steps=steps, epochs=epochs, progress=progress, **keywords)
    elif not isinstance(args, NLFTTrainingArguments):
        raise TypeError(f"args must be NLFTTrainingArguments, got {type(args).__name__}")
    elif steps is not None or epochs is not None or any(v is not None for v in keywords.values()):
        raise ValueError("give the training settings either in args or as keywords, not both")
    in_8bit = bool(getattr(model, "is_loaded_in_8bit", False))
    if in_8bit and not args.lora:
        raise ValueError("a model with 8-bit base weights trains through LoRA only (drop --full or --load-in-8bit)")
    features = encode_records(records, tokenizer, templates, args.max_length)
    if not features:
        raise ValueError("no record fits max_length: nothing to train on")
    # What the Trainer runs on: the steps counted here for epochs, the model prepared here.
    run_args = copy.copy(args)
    if args.max_steps <= 0:
        batch, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
        run_args.max_steps = steps_for_epochs(len(features), args.num_train_epochs, batch, accum)
    checkpointing = bool(getattr(args, CHECKPOINTING_FIELD))
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if hasattr(run_args, name):
            setattr(run_args, name, False)
    run_args.dataloader_pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()  # no warning on CPU
    transformers.set_seed(args.seed)  # the LoRA weights' init too
    if in_8bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        # Non-reentrant: frozen inputs (LoRA) need no requires_grad trick to keep their gradient path.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora:
        model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    with tempfile.TemporaryDirectory(prefix="nlft-train-") as scratch:
        if args.save_to is None and args.save_strategy == "no":
            run_args.output_dir = scratch  # the Trainer makes its folder: no folder left where none was named
        trainer = NLFTTrainer(
            model=model,
            args=run_args,
            train_dataset=features,
            processing_class=tokenizer,
            nlft_config=config,
            judge_nll_weight=args.judge_nll_weight,
        )
        trainer.train()
    model.eval()
    if args.save_to is not None:
        model.save_pretrained(args.save_to)
        tokenizer.save_pretrained(args.save_to)
    return model
