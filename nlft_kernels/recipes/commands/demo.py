"""``nlft demo``: eval -> generate -> judge -> saliency map -> train -> eval on one model, with the
accuracy before and after; every artifact in --out."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from nlft_kernels.recipes.commands import common
from nlft_kernels.recipes.commands.eval import evaluate
from nlft_kernels.recipes.commands.generate import choose, generate, plan, settings
from nlft_kernels.recipes.commands.judge import function_judge, judge_file
from nlft_kernels.recipes.commands.saliency import saliency_map
from nlft_kernels.recipes.commands.settings import add_config_flag, nlft_config, training_arguments
from nlft_kernels.recipes.commands.train import add_training_flags, train_and_save

DEMO_MAX_NEW_TOKENS = 128
DEMO_STEPS = 4

HELP = "generate -> judge -> train -> eval on the embedded SmolLM2, with accuracy before and after"


def add_parser(subparsers) -> argparse.ArgumentParser:
    from nlft_kernels.config import NLFTConfig
    from nlft_kernels.training.arguments import NLFTTrainingArguments

    p = subparsers.add_parser(
        "demo",
        dataclass_types=[NLFTTrainingArguments, NLFTConfig],
        usage="nlft demo [--model M] [--data D] [--samples N] [--steps N] [--out FOLDER] [--config FILE.yaml] "
        "[any flag below]",
        help=HELP,
        description=f"Evaluate, generate --samples responses, judge them, map their saliency, NLFT-train on them "
        f"(--steps, default {DEMO_STEPS}; --batch-size is the training batch) and evaluate again. Every training "
        "and NLFTConfig flag of `nlft train` works here too; --seed seeds the questions and the training.",
    )
    add_training_flags(p)
    common.add_model_flags(p)
    p.add_argument(
        "--data",
        default=None,
        help="folder with train.jsonl and test.jsonl, or a hub name[:config] with train/test splits "
        "(default: the GSM8K embedded in the package)",
    )
    common.add_generation_flags(p, samples=8, max_new_tokens=DEMO_MAX_NEW_TOKENS, batch_flag="--generate-batch-size")
    p.add_argument(
        "--eval-samples", type=int, default=None, help="test questions for the evaluations (default: --samples)"
    )
    p.add_argument(
        "--judge", default=None, help="rule (default), or module:function / file.py:function of your own judge"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sample the training responses at this temperature (default: greedy)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("nlft-demo"), help="folder for the artifacts (its files are replaced)"
    )
    add_config_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    from nlft_kernels.recipes.outputs import check_out_folder, write_json
    from nlft_kernels.recipes.questions import read_questions

    started = time.perf_counter()
    gen = settings(args)
    eval_gen = dataclasses.replace(gen, temperature=None)  # evaluations are greedy
    train_settings = training_arguments(args, DEMO_STEPS)
    config = nlft_config(args)
    judge = function_judge(args.judge)  # --model is the trained model here, not a judge's
    out = check_out_folder(args.out)
    # Both splits first: a bad --data fails before the model loads.
    train_questions, test_questions = read_questions(args.data, "train"), read_questions(args.data, "test")
    chosen = choose(train_questions.rows, args.samples, args.seed)
    eval_samples = args.eval_samples or args.samples
    choose(test_questions.rows, eval_samples, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = common.load(args.model, args.dtype, args.load_in_8bit)
    name = args.model or "smollm2"

    common.say("\n== eval before training")
    before = evaluate(model, tokenizer, test_questions, eval_samples, eval_gen, name, out / "eval_before.json",
                      "accuracy before")  # fmt: skip
    common.say("\n== generate")
    responses = out / "responses.jsonl"
    with plan(train_questions, chosen, responses, gen, name, overwrite=True) as todo:
        generate(model, tokenizer, todo, train_questions.source)
    common.say("\n== judge")
    from nlft_kernels.training.data import read_numbered_jsonl

    judge_file(read_numbered_jsonl(responses), judge, out / "records.jsonl", overwrite=True)
    records = common.records_file(out / "records.jsonl")
    common.say("\n== saliency map")  # the weights NLFT gives the responses' tokens at the start of training
    batch, length = train_settings.per_device_train_batch_size, train_settings.max_length
    saliency_map(model, tokenizer, records, config, out, model_name=args.model or common.EMBEDDED_MODEL,
                 batch_size=batch, max_length=length)  # fmt: skip
    common.say("\n== train")
    model = train_and_save(model, tokenizer, records, train_settings, config, out / "model")
    common.say("\n== eval after training")
    after = evaluate(model, tokenizer, test_questions, eval_samples, eval_gen, name, out / "eval_after.json",
                     "accuracy after")  # fmt: skip
    summary = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "count": after["count"],
        "train_records": len(records),
        "train_wrong": sum(not r.correct for r in records),
        "steps": train_settings.max_steps,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out / "summary.json", summary)
    common.say(
        f"\nGSM8K accuracy on {after['count']} test questions: before {100 * before['accuracy']:.2f}% -> "
        f"after {100 * after['accuracy']:.2f}% ({summary['steps']} NLFT steps on {len(records)} responses, "
        f"{summary['seconds']:.0f} s; artifacts in {out})"
    )
    return 0
