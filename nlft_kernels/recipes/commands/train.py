"""``nlft train``: NLFT-train a model on judged records and save it (LoRA merged)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nlft_kernels.recipes.commands import CommandHelp, common
from nlft_kernels.recipes.commands.settings import nlft_config, training_arguments, training_parser_defaults
from nlft_kernels.recipes.errors import BadInput

DEFAULT_STEPS = 20

HELP = CommandHelp(
    "NLFT-train a model on judged records",
    usage="nlft train --data RECORDS.jsonl --out FOLDER [--model M] [--steps N | --epochs E] [--config FILE.yaml] "
    "[any flag below]",
    description=f"NLFT-train a model on judged records (--steps, default {DEFAULT_STEPS}, or --epochs) and "
    "save it to --out. Every field of NLFTTrainingArguments (transformers' TrainingArguments and NLFT's: "
    "LoRA, max_length, judge_nll_weight) and of NLFTConfig is a flag; --config reads them from YAML.",
)


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """What the dataclass flags leave out: --full (every weight; --no-lora), --steps/--epochs unset."""
    training_parser_defaults(p)
    p.add_argument("--full", dest="lora", action="store_false", help="train every weight (as --no-lora)")


def dataclass_types() -> list[type]:
    from nlft_kernels.config import NLFTConfig
    from nlft_kernels.training.arguments import NLFTTrainingArguments

    return [NLFTTrainingArguments, NLFTConfig]


def add_flags(p: argparse.ArgumentParser) -> None:
    add_training_flags(p)
    common.add_model_flags(p)
    p.add_argument("--data", type=Path, required=True, help="JSONL of NLFT records (from `nlft judge`)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for the trained model (LoRA merged; with --load-in-8bit the LoRA adapter alone, unmerged)",
    )


def train_and_save(model, tokenizer, records, settings, config, out: Path):
    """NLFT-train ``model`` on ``records`` (``settings``: NLFTTrainingArguments, ``config``:
    NLFTConfig) and save it to ``out``; returns the trained model. A setting the model or the
    records cannot take (LoRA targets it lacks, ...) is BadInput."""
    from nlft_kernels.recipes.models import save_model, saves_adapter_only
    from nlft_kernels.training import train

    wrong = sum(not r.correct for r in records)
    length = f"{settings.max_steps} steps" if settings.max_steps > 0 else f"{settings.num_train_epochs:g} epochs"
    common.say(f"training on {len(records)} records ({wrong} wrong, {len(records) - wrong} correct) for {length}")
    try:
        model = train(model, tokenizer, records, settings, config=config)
    except ValueError as err:
        raise BadInput(str(err)) from None
    if hasattr(model, "merge_and_unload") and not saves_adapter_only(model):
        model = model.merge_and_unload()  # the model evaluated next is the one saved
    if save_model(model, tokenizer, out) == "adapter":  # 8-bit base weights: merging would round the update away
        base = model.peft_config["default"].base_model_name_or_path
        common.say(f"saved the LoRA adapter, not merged (merging into 8-bit weights would round the update away), "
                   f"and the tokenizer to {out}; `--model {out}` loads it onto its base model {base}")  # fmt: skip
    else:
        common.say(f"saved the trained model to {out}" + (" (LoRA merged)" if settings.lora else ""))
    return model


def run(args: argparse.Namespace) -> int:
    from nlft_kernels.recipes.outputs import check_out_folder

    settings = training_arguments(args, DEFAULT_STEPS)
    config = nlft_config(args)
    if args.load_in_8bit and not settings.lora:
        raise BadInput("--load-in-8bit trains through LoRA only: drop --full")
    check_out_folder(args.out)
    records = common.records_file(args.data)
    model, tokenizer = common.load(args.model, args.dtype, args.load_in_8bit)
    train_and_save(model, tokenizer, records, settings, config, args.out)
    return 0
