"""The training settings of NLFT as one dataclass, TRL-style: ``transformers.TrainingArguments``
plus LoRA, the views' length and the judge-view NLL, each field with its ``help``, checked in
``__post_init__``. :func:`nlft_kernels.training.train` runs :class:`NLFTTrainer` on them and the
``nlft train`` flags are generated from them (and from ``NLFTConfig``).
"""

import dataclasses
import math
from dataclasses import dataclass, field

import transformers

_TRAINING_FIELDS = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
# transformers 5 renamed these; the settings below reach whichever field this version has.
WARMUP_FIELD = "warmup_ratio" if "warmup_ratio" in _TRAINING_FIELDS else "warmup_steps"  # 5: steps < 1 = a ratio
CHECKPOINTING_FIELD = (
    "activation_checkpointing" if "activation_checkpointing" in _TRAINING_FIELDS else "gradient_checkpointing"
)


@dataclass
class NLFTTrainingArguments(transformers.TrainingArguments):
    """``TrainingArguments`` for NLFT: the Trainer's settings (steps or epochs, batch size,
    accumulation, learning rate and schedule, warm-up, seed, bf16, ...) with NLFT's defaults, and
    the fields of :func:`nlft_kernels.training.train`'s model preparation and data.

    Defaults differing from ``TrainingArguments``': learning rate 1e-4, a constant schedule
    (after the warm-up, if any), 2 records per micro-batch, seed 0, no checkpoint folders
    (``save_strategy="no"``), no logging integration (``report_to="none"``), no output folder
    (``output_dir=None``: :func:`train` saves the trained model only when one is named).

    The ``nlft`` command parses these fields with ``HfArgumentParser``: each is a flag
    ``--field_name`` / ``--field-name``; ``aliases`` in a field's metadata are its short flags
    (``--lr``, ``--steps``, ...). Every check is here, in ``__post_init__``.
    """

    _argument_group_name = "training (NLFTTrainingArguments: transformers' TrainingArguments and NLFT's fields)"

    output_dir: str | None = field(
        default=None,
        metadata={"help": "where train() saves the trained model (the LoRA adapter, or every weight) and the "
                  "tokenizer; checkpoints go there too when save_strategy asks for them (default: none)"},
    )  # fmt: skip
    max_steps: int = field(
        default=-1, metadata={"help": "optimizer steps (-1: num_train_epochs passes instead)", "aliases": ["--steps"]}
    )
    num_train_epochs: float = field(
        default=3.0,
        metadata={"help": "passes over the records when max_steps is -1 (the last step may be partial)",
                  "aliases": ["--epochs"]},
    )  # fmt: skip
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate", "aliases": ["--lr"]})
    lr_scheduler_type: str = field(
        default="constant",
        metadata={"help": "learning-rate schedule after the warm-up: constant, linear or cosine decay (any "
                  "transformers SchedulerType)", "aliases": ["--lr-scheduler"]},
    )  # fmt: skip
    per_device_train_batch_size: int = field(
        default=2, metadata={"help": "records per micro-batch", "aliases": ["--batch-size"]}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step", "aliases": ["--grad-accum"]}
    )
    if WARMUP_FIELD == "warmup_steps":  # transformers 5: one field, below 1 a share of the steps
        warmup_steps: float = field(
            default=0,
            metadata={"help": "linear warm-up: a number of steps, or below 1 a share of the steps (--warmup-ratio)",
                      "aliases": ["--warmup-ratio"]},
        )  # fmt: skip
    if CHECKPOINTING_FIELD == "activation_checkpointing":
        # transformers 5 renamed it; NLFT keeps the name users know, as a flag that needs no value.
        gradient_checkpointing: bool | None = field(
            default=None,
            metadata={"help": "recompute activations in backward (less memory); sets activation_checkpointing",
                      "nargs": "?", "const": True},
        )  # fmt: skip
    seed: int = field(default=0, metadata={"help": "seed of the record order and of the LoRA weights' init"})
    save_strategy: str = field(default="no", metadata={"help": "checkpoints during training: no, steps or epoch"})
    # None first, as in TrainingArguments: HfArgumentParser then parses the flag as a string.
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "logging integrations (wandb, tensorboard, ...); none by default"}
    )
    lora: bool = field(default=True, metadata={"help": "train LoRA adapters (peft); False trains every weight"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (the authors': 16)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the authors': 16)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (the authors': 0.05)"})
    lora_targets: list[str] | None = field(
        default=None,
        metadata={"help": "module names that get LoRA adapters (default: gate_proj, up_proj, down_proj where the "
                  "model has them, as the authors; else peft's default for the architecture)"},
    )  # fmt: skip
    max_length: int = field(
        default=1024,
        metadata={"help": "longest view in tokens; longer responses are truncated, keeping their first tokens"},
    )
    judge_nll_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the aligned judge-view NLL of wrong samples (0: the judge view is a pure "
                  "teacher; the authors' scale: 10)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        _at_least(self, "per_device_train_batch_size", 1)
        _at_least(self, "gradient_accumulation_steps", 1)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps (--steps) must be >= 1, or -1 for num_train_epochs, got {self.max_steps}")
        if self.max_steps == -1 and not (self.num_train_epochs > 0 and math.isfinite(self.num_train_epochs)):
            epochs = self.num_train_epochs
            raise ValueError(f"num_train_epochs (--epochs) must be a positive finite number, got {epochs}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate (--lr) must be a positive finite number, got {self.learning_rate}")
        _at_least(self, "lora_r", 1)
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha must be a positive finite number, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.lora_targets, str):
            self.lora_targets = [self.lora_targets]
        if self.lora_targets is not None:  # "q_proj,v_proj" or "q_proj v_proj", as on a command line
            self.lora_targets = [t.strip() for item in self.lora_targets for t in str(item).split(",") if t.strip()]
            if not self.lora_targets:
                raise ValueError("lora_targets must name at least one module, got none")
        _at_least(self, "max_length", 1)
        if not (self.judge_nll_weight >= 0 and math.isfinite(self.judge_nll_weight)):
            raise ValueError(f"judge_nll_weight must be a finite number >= 0, got {self.judge_nll_weight}")
        warmup = getattr(self, WARMUP_FIELD)
        if not (warmup >= 0 and math.isfinite(warmup)) or (WARMUP_FIELD == "warmup_ratio" and warmup >= 1):
            raise ValueError(f"{WARMUP_FIELD} (--warmup-ratio) must be in [0, 1), got {warmup}")
        if self.lr_scheduler_type == "constant" and warmup > 0:
            self.lr_scheduler_type = "constant_with_warmup"  # transformers' "constant" ignores the warm-up
        if CHECKPOINTING_FIELD == "activation_checkpointing" and self.gradient_checkpointing is not None:
            if self.activation_checkpointing is None:  # the old name given: no deprecation warning for it
                self.activation_checkpointing = self.gradient_checkpointing
        # What was asked, before TrainingArguments fills in its own folder name.
        self.save_to = self.output_dir
        super().__post_init__()


def _at_least(args: NLFTTrainingArguments, name: str, low: int) -> None:
    value = getattr(args, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
