"""``nlft saliency``: the saliency map of judged records, each response token coloured by its NLFT
weight (HTML + PNG + JSONL)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nlft_kernels.recipes.commands import CommandHelp, common
from nlft_kernels.recipes.commands.settings import nlft_config
from nlft_kernels.recipes.errors import BadInput

HELP = CommandHelp("a saliency map of judged records: each response token coloured by its NLFT weight (HTML + PNG)")


def dataclass_types() -> list[type]:
    from nlft_kernels.config import NLFTConfig

    return [NLFTConfig]


def add_flags(p: argparse.ArgumentParser) -> None:
    common.add_model_flags(p)
    p.add_argument("--data", type=Path, required=True, help="JSONL of NLFT records (from `nlft judge`)")
    p.add_argument("--out", type=Path, required=True, help="folder for saliency.html, saliency.png and saliency.jsonl")
    p.add_argument("--max-records", type=int, default=None, help="map the first N records (default: all)")
    p.add_argument("--png-records", type=int, default=3, help="records in saliency.png (0: no PNG)")
    p.add_argument("--batch-size", type=int, default=4, help="records per forward")
    p.add_argument("--max-length", type=int, default=1024, help="longest view in tokens, as in training")


def check(max_records: int | None, png_records: int, batch_size: int, max_length: int) -> None:
    for flag, value, low in (("--max-records", max_records, 1), ("--png-records", png_records, 0),
                             ("--batch-size", batch_size, 1), ("--max-length", max_length, 1)):  # fmt: skip
        if value is not None and value < low:
            raise BadInput(f"{flag} must be >= {low}, got {value}")


def saliency_map(model, tokenizer, records, config, out: Path, *, model_name: str, png_records: int = 3,
                 batch_size: int = 4, max_length: int = 1024) -> dict:  # fmt: skip
    """The saliency map of ``records`` written to the folder ``out``; returns the paths written."""
    from nlft_kernels.saliency_map import NO_PNG, saliency_details, write_saliency_map

    wrong = sum(not r.correct for r in records)
    common.say(f"saliency map of {len(records)} records ({wrong} wrong, {len(records) - wrong} correct)")
    details = saliency_details(
        model, tokenizer, records, config=config, max_length=max_length, batch_size=batch_size, progress=True
    )
    paths = write_saliency_map(details, out, subtitle=f"model: {model_name}", png_records=png_records, config=config)
    if "png" not in paths and png_records > 0:
        common.say(NO_PNG)
    common.say(f"wrote the saliency map to {paths['html']}" + (f" and {paths['png']}" if "png" in paths else ""))
    return paths


def run(args: argparse.Namespace) -> int:
    from nlft_kernels.recipes.outputs import check_out_folder

    check(args.max_records, args.png_records, args.batch_size, args.max_length)
    config = nlft_config(args)
    check_out_folder(args.out)
    records = common.records_file(args.data, limit=args.max_records)
    model, tokenizer = common.load(args.model, args.dtype, args.load_in_8bit)
    name = args.model or common.EMBEDDED_MODEL
    saliency_map(model, tokenizer, records, config, args.out, model_name=name, png_records=args.png_records,
                 batch_size=args.batch_size, max_length=args.max_length)  # fmt: skip
    return 0
