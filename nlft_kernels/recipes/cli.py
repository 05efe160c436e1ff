"""The ``nlft`` command: generate -> judge -> train -> eval, ``saliency`` (the saliency map of
judged records), and ``demo``, which runs them all.

Every subcommand takes ``--model`` (default: the embedded SmolLM2-135M-Instruct; or a Hugging
Face model folder or hub name) and ``--data`` (default: the GSM8K embedded in the package, read
with no network; or a JSONL file, a folder of ``{train,test}.jsonl`` or a ``datasets`` hub name,
``name[:config]``). Heavy imports (torch, transformers) wait until a subcommand runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

DEMO_MAX_NEW_TOKENS = 128
EXIT_RECORD_ERRORS = 3
JUDGE_EXIT_POLICY = (
    "When it stops: a judge that cannot be reached (connection refused, unknown host, HTTP 401/403/404) stops "
    "the run at once, and so do --max-consecutive-failures records in a row with no reply at all (timeouts, "
    "resets) after their retries; Ctrl-C ends the requests in flight and their retries at once. Every record "
    "judged before a stop is kept in --out: the same command resumes. A record that got no verdict (a "
    "malformed reply, HTTP 5xx or a timeout after the retries) is written with an 'error' field and retried by "
    "the next run; the count of such records is printed on stderr. Exit status: 0 the run finished (every "
    f"record has a verdict, or an error when not --strict); {EXIT_RECORD_ERRORS} the run finished with --strict "
    "and some records have an error; 1 the run stopped (judge unreachable); 2 bad arguments or input; "
    "130 interrupted."
)


# ------------------------------------------------------------------------------ argument types


def _int_at_least(low: int):
    """An argparse type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _finite_float(low: float, strict: bool):
    """An argparse type: a finite number > ``low`` (``strict``) or >= ``low`` (no nan or inf)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > low if strict else value >= low) or value == float("inf"):
            bound = "a positive finite number" if strict and low == 0 else f"a finite number >= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


_positive_float = _finite_float(0, strict=True)
_non_negative_float = _finite_float(0, strict=False)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


# ------------------------------------------------------------------------------------ data


def _split_file(folder: Path, split: str) -> Path | None:
    """``folder/{split}.jsonl``, or its .xz/.gz copy, if there."""
    for name in (f"{split}.jsonl", f"{split}.jsonl.xz", f"{split}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_data(value: str | None, split: str, parser: argparse.ArgumentParser) -> str:
    """The source :func:`nlft_kernels.training.data.read_rows` reads for ``--data value`` and ``split``:
    the GSM8K embedded in the package when ``value`` is None."""
    from nlft_kernels.training.data import data_suffix

    if value is None:
        from nlft_kernels.recipes.data import GSM8K_SPLITS, gsm8k_file

        if split not in GSM8K_SPLITS:
            parser.error(f"--split {split}: the embedded GSM8K has the splits {', '.join(GSM8K_SPLITS)}")
        return str(gsm8k_file(split))
    path = Path(value)
    if path.is_dir():
        file = _split_file(path, split)
        if file is None:
            parser.error(f"--data {value}: the folder has no {split}.jsonl")
        return str(file)
    if data_suffix(path) in (".jsonl", ".json") and not path.is_file():
        parser.error(f"--data: no such file: {value}")
    return value


def read_data(value: str | None, split: str, parser: argparse.ArgumentParser) -> list[dict]:
    """Rows with ``question`` and ``answer`` (GSM8K's fields) from ``--data``."""
    from nlft_kernels.training.data import read_rows

    source = resolve_data(value, split, parser)
    try:
        rows = read_rows(source, split=split)
    except Exception as err:  # a bad file or an unreachable hub name: say which, as argparse does
        parser.error(f"--data {source}: {err}")
    missing = [i for i, row in enumerate(rows[:1000]) if "question" not in row or "answer" not in row]
    if missing:
        parser.error(f"--data {source}: row {missing[0]} lacks the fields 'question' and 'answer'")
    if not rows:
        parser.error(f"--data {source}: no rows")
    return rows


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _say(message: str) -> None:
    print(message, flush=True)


# The warnings the CLI rewords or has already reported, by their messages (training.data's
# encode_records and load_records): every other warning is shown as Python shows it.
_COUNT_WARNING = re.compile(r"\d+ of \d+ (?:responses truncated|records dropped)")
_SKIPPED_ERROR_ROWS = r".*: \d+ rows skipped: the judge gave them an error"


@contextmanager
def _counts_as_messages(prefix: str):
    """Within the block, encode_records' counts of truncated and dropped responses are printed as
    ``{prefix}: <count>`` lines on stderr (each time, not once per place); other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("always", category=UserWarning, message=_COUNT_WARNING.pattern)
        show = warnings.showwarning

        def show_counts(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, UserWarning) and _COUNT_WARNING.match(str(message)):
                print(f"{prefix}: {message}", file=sys.stderr, flush=True)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = show_counts
        yield


def _accuracy_line(result: dict, label: str = "accuracy") -> str:
    return f"{label}: {100 * result['accuracy']:.2f}% ({result['correct']}/{result['count']})"


# ------------------------------------------------------------------------------- subcommands


def _load(args):
    from nlft_kernels.recipes.models import DTYPES, load_model

    started = time.perf_counter()
    try:
        model, tokenizer = load_model(
            args.model, dtype=DTYPES[args.dtype], load_in_8bit=getattr(args, "load_in_8bit", False)
        )
    except RuntimeError as err:  # a model that cannot be found or read: a message, not a traceback
        sys.exit(f"nlft {args.command}: error: {err}")
    name = args.model or "smollm2 (the embedded SmolLM2-135M-Instruct)"
    _say(f"model {name} loaded in {time.perf_counter() - started:.1f} s")
    return model, tokenizer


def _generate(args, parser, model=None, tokenizer=None) -> list[dict]:
    from nlft_kernels.recipes.generation import GSM8K_INSTRUCTION, generate_responses, sample_rows

    source = Path(resolve_data(args.data, args.split, parser))  # a folder's {split}.jsonl too
    if source.is_file() and _same_file(source, Path(args.out)):
        parser.error(f"--out {args.out} is the input file {source}: inputs are never rewritten; name another file")
    rows = read_data(args.data, args.split, parser)
    chosen = sample_rows(rows, args.samples, args.seed)
    if model is None:
        model, tokenizer = _load(args)
    responses = generate_responses(
        model,
        tokenizer,
        [row["question"] for _, row in chosen],
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        greedy=args.temperature is None,
        temperature=args.temperature or 1.0,
        seed=args.seed,
    )
    out = [
        {"index": i, "question": row["question"], "answer": row["answer"], "response": response}
        | {"instruction": GSM8K_INSTRUCTION}
        for (i, row), response in zip(chosen, responses, strict=True)
    ]
    _write_jsonl(args.out, out)
    _say(f"wrote {len(out)} responses to {args.out}")
    return out


def _make_judge(args, parser):
    """The judge the flags name: --base-url (a server), --local-model (transformers), else --judge."""
    from nlft_kernels.recipes.judging import load_judge
    from nlft_kernels.recipes.llm_judge import BASE_URL_ENV, LocalModelJudge, OpenAIJudge, api_key_from_env
    from nlft_kernels.recipes.rule_judge import rule_judge

    base_url, local = getattr(args, "base_url", None), getattr(args, "local_model", None)
    if not base_url and not local and getattr(args, "model", None):
        base_url = os.environ.get(BASE_URL_ENV)  # the openai client's convention
    if base_url and local:
        parser.error("--base-url and --local-model name two judges: give one")
    if (base_url or local) and args.judge not in (None, "rule"):
        parser.error("--judge names a third judge next to --base-url/--local-model: give one")
    if base_url:
        if not args.model:
            parser.error("--base-url needs --model, the model name the server serves")
        try:
            return OpenAIJudge(
                base_url,
                args.model,
                api_key=api_key_from_env(args.api_key_env),
                timeout=args.timeout,
                max_retries=args.max_retries,
                backoff=args.backoff,
                max_tokens=args.max_tokens,
                temperature=args.judge_temperature,
                response_format=args.response_format,
            )
        except ValueError as err:
            parser.error(f"--base-url: {err}")
    if getattr(args, "model", None) and not base_url:
        parser.error(
            f"--model names the server's model: it needs --base-url or ${BASE_URL_ENV} "
            "(for a local model use --local-model)"
        )
    if local:
        try:
            return LocalModelJudge.from_pretrained(
                None if local == "smollm2" else local, max_new_tokens=args.max_tokens
            )
        except (RuntimeError, ValueError) as err:
            sys.exit(f"nlft judge: error: --local-model {local}: {err}")
    if args.judge in (None, "rule", "builtin"):
        return rule_judge
    try:
        judge = load_judge(args.judge)
    except ValueError as err:
        parser.error(f"--judge: {err}")
    judge.name = args.judge  # written into each row: a resume checks that the judge is the same
    return judge


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (a link or another spelling of the path included)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _judge(args, parser, rows: list[dict] | None = None, overwrite: bool = False):
    """Judge --in (or ``rows``) into --out, resumable; returns the :class:`JudgeRun`."""
    from nlft_kernels.recipes.errors import BadInput
    from nlft_kernels.recipes.jsonl_store import check_output_path
    from nlft_kernels.recipes.judging import MAX_CONSECUTIVE_FAILURES, judge_rows
    from nlft_kernels.recipes.judgment import JudgeUnavailable
    from nlft_kernels.training.data import read_numbered_jsonl

    try:
        check_output_path(args.out)  # before any work (a --local-model judge loads a model)
    except BadInput as err:
        parser.error(f"--out: {err}")
    judge = _make_judge(args, parser)
    if rows is None:
        if _same_file(args.input, args.out):
            parser.error(f"--out {args.out} is the input file: inputs are never rewritten; name another file")
        try:
            numbered = read_numbered_jsonl(args.input)  # the file's line numbers, blank lines counted
        except ValueError as err:
            parser.error(f"--in: {err}")
        source = args.input
    else:
        numbered, source = list(enumerate(rows, 1)), "the generated responses"
    for number, row in numbered:
        missing = [k for k in ("question", "response", "answer") if not isinstance(row.get(k), str)]
        if missing:
            parser.error(
                f"--in {source}, line {number}: missing field {', '.join(missing)} (run `nlft generate` first)"
            )
    concurrency = args.concurrency or (8 if getattr(args, "base_url", None) else 1)
    try:
        run = judge_rows(
            numbered,
            judge,
            args.out,
            concurrency=concurrency,
            overwrite=overwrite or getattr(args, "overwrite", False),
            max_consecutive_failures=getattr(args, "max_consecutive_failures", MAX_CONSECUTIVE_FAILURES),
        )
    except JudgeUnavailable as err:
        sys.exit(f"nlft judge: error: {err}\n(records judged so far are kept in {args.out}; rerun to resume)")
    except KeyboardInterrupt:
        print(f"\nnlft judge: interrupted; the records judged so far are in {args.out}: rerun to resume",
              file=sys.stderr, flush=True)  # fmt: skip
        sys.stdout.flush()
        # Nothing is left to do: the interpreter's teardown of the modules imported (torch,
        # transformers: seconds on a loaded machine) would only delay the shell's prompt.
        os._exit(130)
    except ValueError as err:
        parser.error(f"--out {args.out}: {err}")
    if run.stale:
        _say(f"{args.out}: dropped {run.stale} rows of an earlier run whose input line was edited or deleted")
    if run.repaired:
        _say(f"{args.out}: removed a last line cut short by an earlier crash (its record is judged again)")
    if run.skipped:
        _say(f"resumed: {run.skipped} of {run.total} records were already judged in {args.out}")
    _say(
        f"judged {run.judged} responses: {run.correct} correct, {run.wrong} wrong, {run.errors} errors"
        + (f" ({run.retried} earlier errors retried)" if run.retried else "")
        + f"; wrote {args.out}"
    )
    if run.errors:
        print(f"nlft judge: {run.errors} of {run.total} records have an error instead of a verdict (their 'error' "
              f"field in {args.out}); rerun the same command to retry them", file=sys.stderr, flush=True)  # fmt: skip
    return run


def _judge_command(args, parser) -> int:
    """``nlft judge``: exit status 0 when the run finished (3 with --strict when a record has an error)."""
    return EXIT_RECORD_ERRORS if _judge(args, parser).errors and args.strict else 0


def _judged_records(out: Path) -> list:
    """The NLFT records of a judged file (its error rows, already reported, skipped quietly)."""
    from nlft_kernels.training.data import load_records

    with warnings.catch_warnings():  # any other warning shows
        warnings.filterwarnings("ignore", message=_SKIPPED_ERROR_ROWS, category=UserWarning)
        return load_records(out)


def _train(args, parser, records=None, model=None, tokenizer=None):
    from nlft_kernels.recipes.models import save_model, saves_adapter_only
    from nlft_kernels.training.data import load_records

    try:
        from nlft_kernels.training import train
    except ImportError as err:
        parser.exit(1, f"nlft: error: training is not available ({err})\n")
    if records is None:
        try:
            records = load_records(args.data)
        except (ValueError, FileNotFoundError) as err:
            parser.error(f"--data: {err}")
    if not records:
        parser.error("no NLFT records to train on")
    try:
        config = nlft_config_from_args(args)
        settings = training_arguments_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.load_in_8bit and not args.lora:
        parser.error("--load-in-8bit trains through LoRA only: drop --full")
    if model is None:
        model, tokenizer = _load(args)
    wrong = sum(not r.correct for r in records)
    length = f"{args.epochs:g} epochs" if args.epochs else f"{args.steps} steps"
    _say(f"training on {len(records)} records ({wrong} wrong, {len(records) - wrong} correct) for {length}")
    with _counts_as_messages(f"nlft {args.command}"):
        try:
            model = train(model, tokenizer, records, settings, config=config)
        except ValueError as err:  # a setting the model or the records cannot take: say which
            sys.exit(f"nlft {args.command}: error: {err}")
    if saves_adapter_only(model):  # 8-bit base weights: the adapter alone, unmerged
        save_model(model, tokenizer, args.out)
        base = model.peft_config["default"].base_model_name_or_path
        _say(f"saved the LoRA adapter, not merged (merging into 8-bit weights would round the update away), and "
             f"the tokenizer to {args.out}; `--model {args.out}` loads it onto its base model {base}")  # fmt: skip
        return model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    save_model(model, tokenizer, args.out)
    _say(f"saved the trained model to {args.out}" + (" (LoRA merged)" if args.lora else ""))
    return model


def _eval(args, parser, model=None, tokenizer=None, label: str = "accuracy") -> dict:
    from nlft_kernels.recipes.generation import evaluate_gsm8k

    rows = read_data(args.data, args.split, parser)
    if model is None:
        model, tokenizer = _load(args)
    result = evaluate_gsm8k(
        model,
        tokenizer,
        rows,
        n=args.samples,
        seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    result["model"] = args.model or "smollm2"
    if args.out is not None:
        _write_json(args.out, result)
    _say(_accuracy_line(result, label))
    return result


def _saliency(args, parser, records=None, model=None, tokenizer=None) -> dict:
    from nlft_kernels.saliency_map import saliency_details, write_saliency_map
    from nlft_kernels.training.data import load_records

    if records is None:
        try:
            records = load_records(args.data, limit=args.max_records)
        except (ValueError, FileNotFoundError) as err:
            parser.error(f"--data: {err}")
    records = list(records)[: args.max_records]
    if not records:
        parser.error("no NLFT records to map")
    if model is None:
        model, tokenizer = _load(args)
    try:
        config = nlft_config_from_args(args)  # the same NLFTConfig flags as training
    except ValueError as err:
        parser.error(str(err))
    wrong = sum(not r.correct for r in records)
    _say(f"saliency map of {len(records)} records ({wrong} wrong, {len(records) - wrong} correct)")
    details = saliency_details(
        model, tokenizer, records, config=config, max_length=args.max_length, batch_size=args.batch_size, progress=True
    )
    name = args.model or "smollm2 (the embedded SmolLM2-135M-Instruct)"
    paths = write_saliency_map(
        details, args.out, subtitle=f"model: {name}", png_records=args.png_records, config=config
    )
    if "png" not in paths and args.png_records > 0:
        _say("no saliency.png: it needs matplotlib (pip install matplotlib)")
    _say(f"wrote the saliency map to {paths['html']}" + (f" and {paths['png']}" if "png" in paths else ""))
    return paths


def _demo(args, parser) -> None:
    started = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # Read both splits first: a bad --data fails before the model loads.
    read_data(args.data, "train", parser)
    read_data(args.data, "test", parser)
    model, tokenizer = _load(args)

    def stage(name: str, **fields) -> argparse.Namespace:
        _say(f"\n== {name}")
        return argparse.Namespace(**(vars(args) | fields))

    def evaluate(when: str, model) -> dict:
        """The accuracy on --eval-samples test questions, written to eval_{when}.json."""
        eval_args = dict(split="test", samples=args.eval_samples or args.samples, temperature=None)
        eval_args |= dict(out=out / f"eval_{when}.json")
        return _eval(stage(f"eval {when} training", **eval_args), parser, model, tokenizer, f"accuracy {when}")

    before = evaluate("before", model)
    rows = _generate(stage("generate", split="train", out=out / "responses.jsonl"), parser, model, tokenizer)
    # The demo's judge is the rule-based one or a --judge function (--model is the trained model here).
    judge_args = dict(judge=args.judge, input=None, out=out / "records.jsonl", model=None, base_url=None)
    judge_args |= dict(local_model=None, concurrency=None)
    _judge(stage("judge", **judge_args), parser, rows, overwrite=True)
    records = _judged_records(out / "records.jsonl")
    # The weights NLFT gives the responses' tokens at the start of training.
    saliency_args = dict(out=out, max_records=None, png_records=3, batch_size=args.train_batch_size)
    _saliency(stage("saliency map", **saliency_args), parser, records, model, tokenizer)
    model = _train(
        stage("train", batch_size=args.train_batch_size, out=out / "model"), parser, records, model, tokenizer
    )
    after = evaluate("after", model)
    summary = {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "count": after["count"],
        "train_records": len(records),
        "train_wrong": sum(not r.correct for r in records),
        "steps": args.steps,
        "seconds": round(time.perf_counter() - started, 1),
    }
    _write_json(out / "summary.json", summary)
    _say(
        f"\nGSM8K accuracy on {after['count']} test questions: before {100 * before['accuracy']:.2f}% -> "
        f"after {100 * after['accuracy']:.2f}% ({summary['steps']} NLFT steps on {len(records)} responses, "
        f"{summary['seconds']:.0f} s; artifacts in {out})"
    )


# ---------------------------------------------------------------------------------- parser


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face model folder or hub name (default: the embedded SmolLM2-135M-Instruct; "
        "a folder written by `nlft train` works too)",
    )
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights' dtype (default: fp32)")
    p.add_argument(
        "--load-in-8bit",
        action="store_true",
        help="8-bit base weights through bitsandbytes (the paper's setting; needs a CUDA GPU and bitsandbytes)",
    )


def _add_data(p: argparse.ArgumentParser, split: str, what: str) -> None:
    p.add_argument(
        "--data",
        default=None,
        help=f"{what}: a JSONL file with question/answer, a folder with {{train,test}}.jsonl, or a datasets hub "
        "name[:config] (default: the GSM8K embedded in the package)",
    )
    p.add_argument("--split", default=split, help=f"split of a folder or hub dataset (default: {split})")


def _add_generation(p: argparse.ArgumentParser, samples: int, max_new_tokens: int) -> None:
    p.add_argument("--samples", type=_positive_int, default=samples, help=f"questions to use (default: {samples})")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the question subset (default: 0)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="generation batch size (default: 8)")
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=max_new_tokens,
        help=f"tokens per response (default: {max_new_tokens})",
    )


def add_field_flags(group, cls, specs: dict[str, dict]) -> None:
    """One flag per field of the dataclass ``cls`` named in ``specs`` (field name -> how its flag
    differs from the field: ``flags`` (default ``--field-name``), ``dest`` (default the field's
    name), ``type``, ``default`` (default the field's), ``shown_default``, ``help``, and any other
    argparse setting), added to ``group`` in that order. The help is the field's
    ``metadata["help"]`` and its default: flags and fields cannot drift apart."""
    from dataclasses import MISSING, fields

    by_name = {f.name: f for f in fields(cls)}
    for name, spec in specs.items():
        f, spec = by_name[name], dict(spec)
        field_default = f.default if f.default is not MISSING else None
        flags = spec.pop("flags", [f"--{name.replace('_', '-')}"])
        spec.setdefault("dest", name)
        spec.setdefault("default", field_default)
        shown = spec.pop("shown_default", spec["default"])
        text = spec.pop("help", f.metadata.get("help", "")).replace("%", "%%")
        spec["help"] = f"{text} (default: {shown})"
        if "action" not in spec:
            kind = f.type if isinstance(f.type, type) else {"float": float, "int": int}.get(f.type, str)
            spec.setdefault("type", kind)
        group.add_argument(*flags, **spec)


# The argparse checks of `nlft train`'s flags, one per flag of train_flag_fields() (the
# NLFTTrainingArguments field it sets, whose help the flag shows).
TRAINING_FLAG_CHECKS = {
    "steps": dict(type=_positive_int, help="optimizer steps"),
    "epochs": dict(type=_positive_float, default=None, help="passes over the records, instead of --steps"),
    "lr": dict(type=_positive_float),
    "lr_scheduler": dict(choices=("constant", "linear", "cosine")),
    "warmup_ratio": dict(type=_fraction, default=0.0, help="share of the steps of linear warm-up"),
    "batch_size": dict(type=_positive_int),
    "grad_accum": dict(type=_positive_int, default=1, help="micro-batches per optimizer step"),
    "max_length": dict(type=_positive_int),
    "lora_r": dict(type=_positive_int),
    "lora_alpha": dict(type=_positive_float),
    "lora_dropout": dict(type=_fraction),
    "lora_targets": dict(type=_name_list, help="comma-separated module names that get LoRA adapters",
                         shown_default="gate_proj,up_proj,down_proj, as the authors"),
    "gradient_checkpointing": dict(action="store_true", default=False,
                                   help="recompute activations in backward (less memory)"),
    "judge_nll_weight": dict(type=float),
    "seed": dict(type=_non_negative_int, help="seed of the record order and the LoRA init"),
}  # fmt: skip


def train_flag_fields() -> dict[str, str]:
    """`nlft train`'s training flags (by dest) -> the NLFTTrainingArguments field each sets."""
    from nlft_kernels.training.arguments import CHECKPOINTING_FIELD, WARMUP_FIELD

    return {
        "steps": "max_steps", "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
        "grad_accum": "gradient_accumulation_steps", "lr": "learning_rate", "lr_scheduler": "lr_scheduler_type",
        "warmup_ratio": WARMUP_FIELD, "gradient_checkpointing": CHECKPOINTING_FIELD, "seed": "seed", "lora": "lora",
        "lora_r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
        "lora_targets": "lora_targets", "max_length": "max_length", "judge_nll_weight": "judge_nll_weight",
    }  # fmt: skip


def _training_specs(*keywords: str, **overrides: dict) -> dict[str, dict]:
    """``add_field_flags`` specs of the training flags ``keywords``: flag ``--keyword``, dest ``keyword``."""
    fields = train_flag_fields()
    specs = {}
    for keyword in keywords:
        spec = {"flags": [f"--{keyword.replace('_', '-')}"], "dest": keyword}
        specs[fields[keyword]] = spec | TRAINING_FLAG_CHECKS[keyword] | overrides.get(keyword, {})
    return specs


def _add_training(p: argparse.ArgumentParser, steps: int, batch_flag: str, with_seed: bool = False) -> None:
    """The training flags, generated from NLFTTrainingArguments (and NLFTConfig's, generated too)."""
    from nlft_kernels.training.arguments import NLFTTrainingArguments as Args

    add_field_flags(
        p.add_mutually_exclusive_group(), Args, _training_specs("steps", "epochs", steps={"default": steps})
    )
    mode = p.add_mutually_exclusive_group()
    add_field_flags(mode, Args, {"lora": dict(action="store_true", help="train LoRA adapters")})
    mode.add_argument("--full", dest="lora", action="store_false", help="train every weight")
    batch = {"flags": [batch_flag], "dest": batch_flag[2:].replace("-", "_")}
    names = ["lr", "lr_scheduler", "warmup_ratio", "batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha"]
    names += ["lora_dropout", "lora_targets", "gradient_checkpointing", "judge_nll_weight"]
    add_field_flags(p, Args, _training_specs(*names, *(["seed"] if with_seed else []), batch_size=batch))
    _add_config_flags(p)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per NLFTConfig field, generated from the dataclass (so none is missed), defaults
    left to the config: ``--correct-threshold 0.9`` sets ``NLFTConfig.correct_threshold``."""
    from dataclasses import fields

    from nlft_kernels.config import CLUSTER_CRITERIA, NLFTConfig

    group = p.add_argument_group("the NLFT objective (NLFTConfig; defaults: the authors')")
    specs = {}
    for f in fields(NLFTConfig):
        kind = {"float": float, "int": int, "str": str}[str(f.type)]
        specs[f.name] = dict(
            dest=f"config_{f.name}", default=None, shown_default=f.default, metavar=kind.__name__.upper()
        )
        if f.name == "cluster_criterion":
            specs[f.name]["choices"] = CLUSTER_CRITERIA
    add_field_flags(group, NLFTConfig, specs)


def training_arguments_from_args(args: argparse.Namespace):
    """The NLFTTrainingArguments of the training flags (ValueError: a setting they cannot take)."""
    from nlft_kernels.training.arguments import NLFTTrainingArguments

    fields = train_flag_fields()
    given = {flag: getattr(args, flag, None) for flag in fields if flag not in ("steps", "epochs")}
    given |= {"epochs": args.epochs} if args.epochs else {"steps": args.steps}
    settings = {fields[flag]: value for flag, value in given.items() if value is not None}
    return NLFTTrainingArguments(disable_tqdm=False, **settings)


def nlft_config_from_args(args: argparse.Namespace):
    """The NLFTConfig of the ``--<field>`` flags (unset flags keep the config's defaults)."""
    from dataclasses import fields

    from nlft_kernels.config import NLFTConfig

    given = {f.name: getattr(args, f"config_{f.name}") for f in fields(NLFTConfig)}
    return NLFTConfig(**{k: v for k, v in given.items() if v is not None})


def _add_judge_options(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    p.add_argument(
        "--judge",
        default=None,
        help="rule (default: the built-in GSM8K judge), or module:function / path/file.py:function taking "
        "(question, response, reference) and returning a Judgment, (correct, judgment) or a dict",
    )
    server = p.add_argument_group("LLM judge over an OpenAI-compatible server (vLLM, SGLang, llama.cpp, OpenAI)")
    server.add_argument("--base-url", default=None, help="e.g. http://localhost:8000/v1 (the OpenAI client's base_url)")
    if with_model:
        server.add_argument("--model", default=None, help="the model name the server serves (with --base-url)")
    server.add_argument(
        "--api-key-env",
        default=None,
        help="environment variable holding the API key (default: NLFT_JUDGE_API_KEY, else OPENAI_API_KEY)",
    )
    server.add_argument(
        "--concurrency", type=_positive_int, default=None, help="requests in flight (default: 8; 1 for other judges)"
    )
    server.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        help="seconds per request, in all: connect, wait and the whole reply (default: 60)",
    )
    server.add_argument("--max-retries", type=_non_negative_int, default=3, help="retries per request (default: 3)")
    server.add_argument(
        "--backoff",
        type=_non_negative_float,
        default=1.0,
        help="first retry's wait in seconds, doubled each time (default: 1)",
    )
    server.add_argument(
        "--max-tokens", type=_positive_int, default=512, help="longest judge reply in tokens (default: 512)"
    )
    server.add_argument(
        "--max-consecutive-failures",
        type=_non_negative_int,
        default=5,
        help="stop after this many records in a row got no reply at all (timeouts, resets), after their "
        "retries: the server is down or hung; rerun to resume (default: 5; 0: never stop)",
    )
    server.add_argument(
        "--judge-temperature",
        type=_non_negative_float,
        default=0.0,
        help="sampling temperature of the judge, a finite number >= 0 (default: 0)",
    )
    server.add_argument(
        "--response-format",
        choices=("text", "json_object", "json_schema"),
        default="text",
        help="text (any server); json_object (llama.cpp/vLLM constrain the reply to the verdict schema); "
        "json_schema (OpenAI structured outputs)",
    )
    p.add_argument(
        "--local-model",
        default=None,
        help="a local transformers model as judge: a model folder or hub name, or smollm2 (the embedded one)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``nlft`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="nlft",
        description="Natural Language Fine-Tuning (arXiv 2412.20382): generate responses, judge them, "
        "NLFT-train on the judgments, evaluate on GSM8K.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="generate -> judge -> train -> eval on the embedded SmolLM2, with accuracy before and after",
    )
    _add_model(demo)
    demo.add_argument(
        "--data",
        default=None,
        help="folder with train.jsonl and test.jsonl, or a hub name[:config] with train/test splits "
        "(default: the GSM8K embedded in the package)",
    )
    _add_generation(demo, samples=8, max_new_tokens=DEMO_MAX_NEW_TOKENS)
    demo.add_argument(
        "--eval-samples",
        type=_positive_int,
        default=None,
        help="test questions for the evaluations (default: --samples)",
    )
    demo.add_argument(
        "--judge", default=None, help="rule (default), or module:function / file.py:function of your own judge"
    )
    demo.add_argument(
        "--temperature",
        type=_positive_float,
        default=None,
        help="sample the training responses at this temperature (default: greedy)",
    )
    _add_training(demo, steps=4, batch_flag="--train-batch-size")
    demo.add_argument(
        "--out", type=Path, default=Path("nlft-demo"), help="folder for the artifacts (default: nlft-demo)"
    )

    gen = sub.add_parser("generate", help="generate one response per question (JSONL out)")
    _add_model(gen)
    _add_data(gen, "train", "questions")
    _add_generation(gen, samples=8, max_new_tokens=256)
    gen.add_argument(
        "--temperature", type=_positive_float, default=None, help="sample at this temperature (default: greedy)"
    )
    gen.add_argument("--out", type=Path, required=True, help="JSONL of question, answer, response")

    judge = sub.add_parser(
        "judge",
        help="judge responses against the reference solutions (NLFT records out): rules, LLM server or local model",
        description="Judge responses against the reference solutions; each result is appended to --out as it "
        "arrives, and a rerun resumes.",
        epilog=JUDGE_EXIT_POLICY,
    )
    judge.add_argument("--in", dest="input", type=_existing_file, required=True, help="JSONL from `nlft generate`")
    judge.add_argument(
        "--out", type=Path, required=True, help="JSONL of NLFT records, appended per record; a rerun resumes"
    )
    _add_judge_options(judge)
    judge.add_argument("--overwrite", action="store_true", help="start --out afresh instead of resuming")
    judge.add_argument(
        "--strict",
        action="store_true",
        help=f"exit with status {EXIT_RECORD_ERRORS} when any record ends with an error instead of a verdict "
        "(default: 0, with their count on stderr)",
    )

    train = sub.add_parser("train", help="NLFT-train a model on judged records")
    _add_model(train)
    train.add_argument("--data", type=_existing_file, required=True, help="JSONL of NLFT records (from `nlft judge`)")
    _add_training(train, steps=20, batch_flag="--batch-size", with_seed=True)
    train.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for the trained model (LoRA merged; with --load-in-8bit the LoRA adapter alone, unmerged)",
    )

    sal = sub.add_parser(
        "saliency",
        help="a saliency map of judged records: each response token coloured by its NLFT weight (HTML + PNG)",
    )
    _add_model(sal)
    sal.add_argument("--data", type=_existing_file, required=True, help="JSONL of NLFT records (from `nlft judge`)")
    sal.add_argument(
        "--out", type=Path, required=True, help="folder for saliency.html, saliency.png and saliency.jsonl"
    )
    sal.add_argument("--max-records", type=_positive_int, default=None, help="map the first N records (default: all)")
    sal.add_argument(
        "--png-records", type=_non_negative_int, default=3, help="records in saliency.png (default: 3; 0: no PNG)"
    )
    sal.add_argument("--batch-size", type=_positive_int, default=4, help="records per forward (default: 4)")
    sal.add_argument(
        "--max-length", type=_positive_int, default=1024, help="longest view in tokens, as in training (default: 1024)"
    )
    _add_config_flags(sal)

    ev = sub.add_parser("eval", help="GSM8K accuracy (greedy) on a fixed-seed subset")
    _add_model(ev)
    _add_data(ev, "test", "problems with reference answers")
    _add_generation(ev, samples=50, max_new_tokens=256)
    ev.add_argument("--out", type=Path, default=None, help="JSON with the accuracy and every sample")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nlft`` command line; returns the exit status."""
    try:
        parser = build_parser()
    except ImportError as err:  # the core alone is installed: the command needs the train extra
        sys.exit(f"nlft: error: the nlft command needs the train extra ({err}): pip install 'nlft-kernels[train]'")
    args = parser.parse_args(argv)
    commands = {
        "demo": _demo,
        "generate": _generate,
        "judge": _judge_command,
        "train": _train,
        "saliency": _saliency,
        "eval": _eval,
    }
    return commands[args.command](args, parser) or 0  # a command returns its exit status, or nothing for 0


if __name__ == "__main__":
    sys.exit(main())
