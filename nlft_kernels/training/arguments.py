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
LR_SCHEDULERS = ("constant", "linear", "cosine")


@dataclass
class NLFTTrainingArguments(transformers.TrainingArguments):
    """``TrainingArguments`` for NLFT: the Trainer's settings (steps or epochs, batch size,
    accumulation, learning rate and schedule, warm-up, seed, bf16, ...) with NLFT's defaults, and
    the fields of :func:`nlft_kernels.training.train`'s model preparation and data.

    Defaults differing from ``TrainingArguments``': learning rate 1e-4, a constant schedule
    (after the warm-up, if any), 2 records per micro-batch, seed 0, no checkpoint folders
    (``save_strategy="no"``), no logging integration (``report_to="none"``), no output folder
    (``output_dir=None``: :func:`train` saves the trained model only when one is named).
    """

    output_dir: str | None = field(
        default=None,
        metadata={"help": "where train() saves the trained model (the LoRA adapter, or every weight) and the "
                  "tokenizer; checkpoints go there too when save_strategy asks for them (default: none)"},
    )  # fmt: skip
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    lr_scheduler_type: str = field(
        default="constant",
        metadata={"help": "learning-rate schedule after the warm-up: constant, linear or cosine decay (any "
                  "transformers SchedulerType)"},
    )  # fmt: skip
    per_device_train_batch_size: int = field(default=2, metadata={"help": "records per micro-batch"})
    seed: int = field(default=0, metadata={"help": "seed of the record order and of the LoRA weights' init"})
    save_strategy: str = field(default="no", metadata={"help": "checkpoints during training: no, steps or epoch"})
    report_to: str | list[str] | None = field(
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
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha must be a positive finite number, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.lora_targets, str):  # "q_proj,v_proj", as on a command line
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        if self.lora_targets is not None and (not self.lora_targets or not all(self.lora_targets)):
            raise ValueError(f"lora_targets must name at least one module, got {self.lora_targets!r}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if not (self.judge_nll_weight >= 0 and math.isfinite(self.judge_nll_weight)):
            raise ValueError(f"judge_nll_weight must be a finite number >= 0, got {self.judge_nll_weight}")
        warmup = getattr(self, WARMUP_FIELD)
        if not 0.0 <= warmup < 1.0 and WARMUP_FIELD == "warmup_ratio":
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup}")
        if self.lr_scheduler_type == "constant" and warmup > 0:
            self.lr_scheduler_type = "constant_with_warmup"  # transformers' "constant" ignores the warm-up
        # What was asked, before TrainingArguments fills in its own folder name.
        self.save_to = self.output_dir
        super().__post_init__()
