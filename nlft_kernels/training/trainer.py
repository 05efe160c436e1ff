"""NLFT training on a transformers causal LM: a plain-loop step (:func:`nlft_step`), a ``Trainer``
(:class:`NLFTTrainer`) and the one entry point :func:`train`. Both the step and the Trainer's
``compute_loss`` are :func:`nlft_kernels.training.batch_loss.nlft_batch_loss`.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Sequence

import torch
import transformers
from torch import nn

from nlft_kernels.config import NLFTConfig
from nlft_kernels.training.arguments import CHECKPOINTING_FIELD, NLFTTrainingArguments
from nlft_kernels.training.batch_loss import nlft_batch_loss
from nlft_kernels.training.data import (
    DEFAULT_TEMPLATES,
    VIEWS,
    NLFTCollator,
    NLFTRecord,
    PromptTemplates,
    encode_records,
    pad_token_id_of,
)

# Every key that encode_record writes: the Trainer must not drop them as "unused columns".
FEATURE_COLUMNS = ["labels", "correct"] + [f"{v}_{k}" for v in VIEWS for k in ("input_ids", "prompt_length")]


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

    nlft_config: the objective's constants; judge_nll_weight: see :func:`nlft_batch_loss`
    (default: ``args.judge_nll_weight`` of :class:`NLFTTrainingArguments`, 0 for plain
    ``TrainingArguments``).
    """

    def __init__(self, *args, nlft_config: NLFTConfig = NLFTConfig(), judge_nll_weight: float | None = None, **kwargs):
        tokenizer = kwargs.get("processing_class")
        self.pad_token_id = pad_token_id_of(tokenizer) if tokenizer is not None else 0
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = NLFTCollator(self.pad_token_id, nlft_config.ignore_index)
        super().__init__(*args, **kwargs)
        self.nlft_config = nlft_config
        if judge_nll_weight is None:
            judge_nll_weight = getattr(self.args, "judge_nll_weight", 0.0)
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
) -> nn.Module:
    """NLFT-train ``model`` on ``records`` with :class:`NLFTTrainer`; returns the trained model (a
    peft model when ``args.lora``), in eval mode.

    ``args``: every training setting (:class:`NLFTTrainingArguments`; default: its defaults):
    ``max_steps`` optimizer steps or ``num_train_epochs`` passes over the records (the last step
    may be partial), each of ``gradient_accumulation_steps`` micro-batches of
    ``per_device_train_batch_size`` records in a seeded shuffled order, the Trainer's AdamW at
    ``learning_rate`` with ``lr_scheduler_type`` after the warm-up; a tqdm bar unless
    ``disable_tqdm``. ``config``: the objective's constants; ``templates``: the prompt views.
    Before the Trainer runs, the model is prepared here: a model loaded in 8 bits
    (bitsandbytes) through peft's ``prepare_model_for_kbit_training`` (it trains through LoRA
    only), gradient checkpointing (non-reentrant) on the base view, then the LoRA adapter
    (``lora_r``, ``lora_alpha``, ``lora_dropout`` on ``lora_targets``, by default the
    gate/up/down projections). With ``output_dir``, the adapter (LoRA) or the full model and the
    tokenizer are saved there at the end; no checkpoint folder is written unless
    ``args.save_strategy`` asks for one, and no folder at all without ``output_dir``.
    """
    if args is None:
        args = NLFTTrainingArguments()
    elif not isinstance(args, NLFTTrainingArguments):
        raise TypeError(f"args must be NLFTTrainingArguments, got {type(args).__name__}")
    records = list(records)
    if not records:
        raise ValueError("the record list is empty: nothing to train on")
    in_8bit = bool(getattr(model, "is_loaded_in_8bit", False))
    if in_8bit and not args.lora:
        raise ValueError("a model with 8-bit base weights trains through LoRA only (drop --full or --load-in-8bit)")
    features = encode_records(records, tokenizer, templates, args.max_length)
    if not features:
        raise ValueError(f"none of the {len(records)} records fits max_length={args.max_length}: nothing to train on")
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
        )
        trainer.train()
    model.eval()
    if args.save_to is not None:
        model.save_pretrained(args.save_to)
        tokenizer.save_pretrained(args.save_to)
    return model
