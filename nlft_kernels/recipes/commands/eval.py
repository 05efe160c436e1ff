"""``nlft eval``: GSM8K accuracy (greedy) on a fixed-seed subset of questions."""

from __future__ import annotations

import argparse
from pathlib import Path

from nlft_kernels.recipes.commands import common
from nlft_kernels.recipes.commands.generate import choose, settings
from nlft_kernels.recipes.commands.settings import add_config_flag
from nlft_kernels.recipes.errors import BadInput

HELP = "GSM8K accuracy (greedy) on a fixed-seed subset"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help=HELP)
    common.add_model_flags(p)
    common.add_data_flags(p, "test", "problems with reference answers")
    common.add_generation_flags(p, samples=50, max_new_tokens=256)
    common.add_seed_flag(p)
    p.add_argument("--out", type=Path, default=None, help="JSON with the accuracy and every sample")
    add_config_flag(p)
    return p


def evaluate(model, tokenizer, questions, samples: int, gen, model_name: str, out: Path | None = None,
             label: str = "accuracy") -> dict:  # fmt: skip
    """The accuracy of ``model`` on ``samples`` questions drawn with ``gen.seed`` (greedy, ``gen``'s
    max_new_tokens and batch size), written to ``out`` when given. A prompt over the model's
    context is BadInput: an accuracy over fewer questions than asked would mislead."""
    from nlft_kernels.recipes.generate_run import describe_too_long, prompts_too_long
    from nlft_kernels.recipes.generation import evaluate_gsm8k
    from nlft_kernels.recipes.outputs import write_json

    chosen = choose(questions.rows, samples, gen.seed)
    too_long = prompts_too_long(model, tokenizer, chosen, questions.instruction, gen.max_new_tokens)
    if too_long:
        raise BadInput(f"{describe_too_long(too_long, questions.source)}: drop them from --data, or use another --seed")
    result = evaluate_gsm8k(
        model,
        tokenizer,
        questions.rows,
        n=samples,
        seed=gen.seed,
        batch_size=gen.batch_size,
        max_new_tokens=gen.max_new_tokens,
        instruction=questions.instruction,
    )
    result["model"] = model_name
    if out is not None:
        write_json(out, result)
    common.say(common.accuracy_line(result, label))
    return result


def run(args: argparse.Namespace) -> int:
    from nlft_kernels.recipes.outputs import check_out_file
    from nlft_kernels.recipes.questions import read_questions

    gen = settings(args)
    if args.out is not None:
        check_out_file(args.out)
    questions = read_questions(args.data, args.split)
    choose(questions.rows, args.samples, args.seed)  # a bad --samples before the model loads
    model, tokenizer = common.load(args.model, args.dtype, args.load_in_8bit)
    evaluate(model, tokenizer, questions, args.samples, gen, args.model or "smollm2", args.out)
    return 0
