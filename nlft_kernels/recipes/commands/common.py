"""What several commands share: the model, data and generation flags, loading the model, and the
lines a command prints on stdout (results and progress notes; errors go to stderr through main)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nlft_kernels.recipes.errors import BadInput

EMBEDDED_MODEL = "smollm2 (the embedded SmolLM2-135M-Instruct)"


def say(message: str) -> None:
    print(message, flush=True)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="Hugging Face model folder or hub name (default: the embedded SmolLM2-135M-Instruct; "
        "a folder written by `nlft train` works too)",
    )
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights' dtype")
    parser.add_argument(
        "--load-in-8bit",
        action="store_true",
        help="8-bit base weights through bitsandbytes (the paper's setting; needs a CUDA GPU and bitsandbytes)",
    )


def add_data_flags(parser: argparse.ArgumentParser, split: str, what: str) -> None:
    parser.add_argument(
        "--data",
        default=None,
        help=f"{what}: a JSONL file with question/answer, a folder with {{train,test}}.jsonl, or a datasets hub "
        "name[:config] (default: the GSM8K embedded in the package)",
    )
    parser.add_argument("--split", default=split, help="split of a folder or hub dataset")


def add_generation_flags(
    parser: argparse.ArgumentParser, samples: int, max_new_tokens: int, batch_flag: str = "--batch-size"
) -> None:
    """--samples, --max-new-tokens and the generation batch size (checked by GenerationSettings);
    --seed where the command has no training seed of the same name."""
    parser.add_argument("--samples", type=int, default=samples, help="questions to use")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens per response, at most")
    parser.add_argument(batch_flag, dest="generate_batch_size", type=int, default=8, help="generation batch size")


def add_seed_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the question subset (and of sampling)")


def load(name: str | None, dtype: str = "fp32", load_in_8bit: bool = False):
    """``(model, tokenizer)`` of ``--model``; a model that cannot be found or read is BadInput."""
    from nlft_kernels.recipes.models import DTYPES, load_model

    started = time.perf_counter()
    try:
        model, tokenizer = load_model(name, dtype=DTYPES[dtype], load_in_8bit=load_in_8bit)
    except RuntimeError as err:
        raise BadInput(f"--model: {err}") from None
    say(f"model {name or EMBEDDED_MODEL} loaded in {time.perf_counter() - started:.1f} s")
    return model, tokenizer


def records_file(path: Path, limit: int | None = None) -> list:
    """The NLFT records of a JSONL file (``nlft judge``'s output); a bad file or row is BadInput
    naming the file and line, no records at all too."""
    from nlft_kernels.training.data import load_records

    try:
        records = load_records(path, limit=limit)
    except (ValueError, OSError) as err:
        raise BadInput(f"--data {err}" if str(path) in str(err) else f"--data {path}: {err}") from None
    if not records:
        raise BadInput(f"--data {path}: no NLFT records in it")
    return records


def accuracy_line(result: dict, label: str = "accuracy") -> str:
    return f"{label}: {100 * result['accuracy']:.2f}% ({result['correct']}/{result['count']})"
