"""NLFT on a transformers causal LM: records and prompt views (:mod:`.data`), the training
settings (:mod:`.arguments`), the loss of a batch (:mod:`.batch_loss`, reaching the LM head
through :mod:`.heads`), and the plain-loop step, the ``Trainer`` and ``train`` (:mod:`.trainer`)."""

from nlft_kernels.training.arguments import NLFTTrainingArguments
from nlft_kernels.training.batch_loss import nlft_batch_loss
from nlft_kernels.training.data import (
    DEFAULT_TEMPLATES,
    VIEWS,
    NLFTCollator,
    NLFTRecord,
    PromptTemplates,
    encode_record,
    encode_records,
    load_records,
    pad_token_id_of,
    read_rows,
    record_from_row,
    save_records,
)
from nlft_kernels.training.trainer import NLFTTrainer, add_lora, nlft_step, train

__all__ = [
    "DEFAULT_TEMPLATES",
    "VIEWS",
    "NLFTCollator",
    "NLFTRecord",
    "NLFTTrainer",
    "NLFTTrainingArguments",
    "PromptTemplates",
    "add_lora",
    "encode_record",
    "encode_records",
    "load_records",
    "nlft_batch_loss",
    "nlft_step",
    "pad_token_id_of",
    "read_rows",
    "record_from_row",
    "save_records",
    "train",
]
