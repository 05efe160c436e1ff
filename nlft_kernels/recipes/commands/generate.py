"""``nlft generate``: one response per question, appended to --out batch by batch; a rerun resumes."""

from __future__ import annotations

import argparse
from pathlib import Path

from nlft_kernels.recipes.commands import CommandHelp, common
from nlft_kernels.recipes.errors import BadInput, Interrupted

HELP = CommandHelp(
    "generate one response per question (JSONL out, appended per batch; a rerun resumes)",
    description="Generate one response per question into --out. Each batch's rows are appended as it is "
    "done: Ctrl-C or a crash keeps them, and the same command resumes (an edited or dropped question is "
    "generated again; a file made with other settings is refused). Prompts over the model's context are "
    "skipped and named.",
)


def add_flags(p: argparse.ArgumentParser) -> None:
    common.add_model_flags(p)
    common.add_question_flags(p, "train", "questions", samples=8)
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    p.add_argument("--out", type=Path, required=True, help="JSONL of question, answer, response")
    p.add_argument("--overwrite", action="store_true", help="start --out afresh instead of resuming")


def settings(args: argparse.Namespace, task=None):
    """The GenerationSettings of the flags (greedy without --temperature; no --max-new-tokens:
    ``task``'s, or :data:`~nlft_kernels.recipes.commands.common.MAX_NEW_TOKENS`; BadInput: a
    value they cannot take)."""
    from nlft_kernels.recipes.generation import GenerationSettings

    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = task.max_new_tokens if task is not None else common.MAX_NEW_TOKENS
    try:
        return GenerationSettings(
            max_new_tokens=max_new_tokens,
            temperature=getattr(args, "temperature", None),
            seed=args.seed,
            batch_size=args.generate_batch_size,
        )
    except ValueError as err:
        raise BadInput(str(err)) from None


def choose(rows: list[dict], samples: int, seed: int) -> list[tuple[int, dict]]:
    """``samples`` (index, row) pairs drawn with ``seed`` (BadInput: fewer than one)."""
    from nlft_kernels.recipes.generation import sample_rows

    try:
        return sample_rows(rows, samples, seed)
    except ValueError as err:
        raise BadInput(f"--samples: {err}") from None


def plan(questions, chosen, out: Path, settings, model_name: str, overwrite: bool = False):
    """What is left to generate into ``out``, which this run then holds (before the model loads:
    a file that cannot be resumed, or that another process writes, is BadInput, untouched); use
    it as a context manager."""
    from nlft_kernels.recipes.generate_run import plan_generation

    return plan_generation(
        chosen,
        out,
        instruction=questions.instruction,
        settings=settings,
        model_name=model_name,
        overwrite=overwrite,
        task=questions.task,
    )


def generate(model, tokenizer, plan, source: str):
    """Generate ``plan`` (:func:`nlft_kernels.recipes.generate_run.generate_file`), printing what was
    resumed, skipped and written; Ctrl-C is :class:`Interrupted`, saying what was kept."""
    from nlft_kernels.recipes.generate_run import describe_too_long, generate_file

    out = plan.out
    if plan.run.dropped:
        common.say(f"{out}: dropped {plan.run.dropped} rows of questions no longer asked (edited or not chosen)")
    if plan.run.skipped:
        common.say(f"resumed: {plan.run.skipped} of {plan.run.total} responses were already in {out}")
    try:
        run = generate_file(model, tokenizer, plan)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the responses generated so far are in {out}: rerun to resume") from None
    if run.too_long:
        common.say(f"skipped {describe_too_long(run.too_long, source)}")
    common.say(f"wrote {run.generated} responses to {out} ({run.skipped + run.generated} of {run.total} in all)")
    return run


def run(args: argparse.Namespace) -> int:
    from nlft_kernels.recipes.outputs import check_out_file, same_file
    from nlft_kernels.recipes.questions import read_questions

    questions = read_questions(args.data, args.split, args.task, args.samples, args.seed)
    gen = settings(args, questions.task)
    if Path(questions.source).is_file() and same_file(questions.source, args.out):
        raise BadInput(f"--out {args.out} is the input file {questions.source}: inputs are never rewritten")
    check_out_file(args.out)
    chosen = choose(questions.rows, args.samples, args.seed)
    with plan(questions, chosen, args.out, gen, args.model or "smollm2", args.overwrite) as todo:
        model, tokenizer = common.load(args.model, args.dtype, args.load_in_8bit)
        generate(model, tokenizer, todo, questions.source)
    return 0
