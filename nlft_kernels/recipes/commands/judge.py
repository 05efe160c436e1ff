"""``nlft judge``: judge responses against the reference solutions into NLFT records, appended per
record; a rerun resumes. The judge: the rules (default), a function of yours, an LLM server or a
local model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nlft_kernels.recipes.commands import CommandHelp, common
from nlft_kernels.recipes.errors import BadInput, Interrupted, RunStopped, StrictFailure

EXIT_POLICY = (
    "When it stops: a judge that cannot be reached (connection refused, unknown host, HTTP 401/403/404) stops "
    "the run at once, and so do --max-consecutive-failures records in a row with no reply at all (timeouts, "
    "resets) after their retries; Ctrl-C ends the requests in flight and their retries at once. Every record "
    "judged before a stop is kept in --out: the same command resumes. A record that got no verdict (a "
    "malformed reply, HTTP 5xx or a timeout after the retries) is written with an 'error' field and retried by "
    "the next run; the count of such records is printed on stderr. Exit status: 0 the run finished (every "
    "record has a verdict, or an error when not --strict); 3 the run finished with --strict and some records "
    "have an error; 1 the run stopped (judge unreachable); 2 bad arguments or input; 130 interrupted."
)
INPUT_FIELDS = ("question", "response", "answer")

HELP = CommandHelp(
    "judge responses against the reference solutions (NLFT records out): rules, LLM server or local model",
    description="Judge responses against the reference solutions; each result is appended to --out as it "
    "arrives, and a rerun resumes.",
    epilog=EXIT_POLICY,
)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="input", type=Path, required=True, help="JSONL from `nlft generate`")
    p.add_argument(
        "--out", type=Path, required=True, help="JSONL of NLFT records, appended per record; a rerun resumes"
    )
    add_judge_flags(p)
    p.add_argument("--overwrite", action="store_true", help="start --out afresh instead of resuming")
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 3 when any record ends with an error instead of a verdict (default: 0, with their "
        "count on stderr)",
    )


def add_judge_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--judge",
        default=None,
        help="rule (default: the built-in GSM8K judge), or module:function / path/file.py:function taking "
        "(question, response, reference) and returning a Judgment, (correct, judgment) or a dict",
    )
    server = p.add_argument_group("LLM judge over an OpenAI-compatible server (vLLM, SGLang, llama.cpp, OpenAI)")
    server.add_argument("--base-url", default=None, help="e.g. http://localhost:8000/v1 (the OpenAI client's base_url)")
    server.add_argument("--model", default=None, help="the model name the server serves (with --base-url)")
    server.add_argument(
        "--api-key-env",
        default=None,
        help="environment variable holding the API key (default: NLFT_JUDGE_API_KEY, else OPENAI_API_KEY)",
    )
    server.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: 8; 1 for others)")
    server.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        help="seconds per request, in all: connect, wait and the whole reply",
    )
    server.add_argument("--max-retries", type=int, default=3, help="retries per request")
    server.add_argument(
        "--backoff", type=_non_negative_float, default=1.0, help="first retry's wait in seconds, doubled each time"
    )
    server.add_argument("--max-tokens", type=int, default=512, help="longest judge reply in tokens")
    server.add_argument(
        "--max-consecutive-failures",
        type=int,
        default=5,
        help="stop after this many records in a row got no reply at all (timeouts, resets), after their "
        "retries: the server is down or hung; rerun to resume (0: never stop)",
    )
    server.add_argument(
        "--judge-temperature",
        type=_non_negative_float,
        default=0.0,
        help="sampling temperature of the judge, a finite number >= 0",
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


def server_url(args: argparse.Namespace) -> str | None:
    """--base-url, else $OPENAI_BASE_URL (the openai client's convention) when --model names a
    server's model and no other judge is named."""
    from nlft_kernels.recipes.llm_judge import BASE_URL_ENV

    if args.base_url or args.local_model or not args.model:
        return args.base_url
    return os.environ.get(BASE_URL_ENV) or None


def check_judge_flags(args: argparse.Namespace) -> None:
    """BadInput for judge flags that cannot go together or take no such value."""
    from nlft_kernels.recipes.llm_judge import BASE_URL_ENV

    base_url, local = server_url(args), args.local_model
    if base_url and local:
        raise BadInput("--base-url and --local-model name two judges: give one")
    if (base_url or local) and args.judge not in (None, "rule"):
        raise BadInput("--judge names a third judge next to --base-url/--local-model: give one")
    if base_url and not args.model:
        raise BadInput("--base-url needs --model, the model name the server serves")
    if args.model and not base_url:
        raise BadInput(
            f"--model names the server's model: it needs --base-url or ${BASE_URL_ENV} (for a local model use "
            "--local-model)"
        )
    for name, low in (("concurrency", 1), ("max_retries", 0), ("max_tokens", 1), ("max_consecutive_failures", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise BadInput(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def make_judge(args: argparse.Namespace):
    """The judge the flags name: --base-url (a server), --local-model (transformers), else --judge."""
    from nlft_kernels.recipes.llm_judge import LocalModelJudge, OpenAIJudge, api_key_from_env

    check_judge_flags(args)
    base_url, local = server_url(args), args.local_model
    if base_url:
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
            raise BadInput(f"--base-url: {err}") from None
    if local:
        try:
            return LocalModelJudge.from_pretrained(
                None if local == "smollm2" else local, max_new_tokens=args.max_tokens
            )
        except (RuntimeError, ValueError) as err:
            raise BadInput(f"--local-model {local}: {err}") from None
    return function_judge(args.judge)


def function_judge(spec: str | None):
    """The rule judge (``spec`` None or "rule"), or the function ``module:function`` /
    ``file.py:function`` names."""
    from nlft_kernels.recipes.judging import load_judge
    from nlft_kernels.recipes.rule_judge import rule_judge

    if spec in (None, "rule", "builtin"):
        return rule_judge
    try:
        judge = load_judge(spec)
    except ValueError as err:
        raise BadInput(f"--judge: {err}") from None
    judge.name = spec  # written into each row: a resume checks that the judge is the same
    return judge


def check_rows(numbered: list[tuple[int, dict]], source: str) -> None:
    """BadInput naming the line of the first row whose question, response or answer is missing or
    not a string."""
    for number, row in numbered:
        for name in INPUT_FIELDS:
            if row.get(name) is None:
                raise BadInput(f"--in {source}, line {number}: missing field {name} (run `nlft generate` first)")
            if not isinstance(row[name], str):
                raise BadInput(
                    f"--in {source}, line {number}: field {name} must be a string, got {type(row[name]).__name__}"
                )


def judge_file(numbered, judge, out: Path, *, concurrency: int = 1, overwrite: bool = False, max_failures: int = 5):
    """Judge ``numbered`` ((line, row) pairs) into ``out`` (:func:`nlft_kernels.recipes.judging.judge_rows`), printing
    what was resumed and judged; typed errors for a stop, Ctrl-C and a file that cannot be resumed."""
    from nlft_kernels.recipes.judging import judge_rows
    from nlft_kernels.recipes.judgment import JudgeUnavailable

    try:
        run = judge_rows(
            numbered, judge, out, concurrency=concurrency, overwrite=overwrite, max_consecutive_failures=max_failures
        )
    except JudgeUnavailable as err:
        raise RunStopped(f"{err} (records judged so far are kept in {out}; rerun to resume)") from None
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the records judged so far are in {out}: rerun to resume") from None
    if run.stale:
        common.say(f"{out}: dropped {run.stale} rows of an earlier run whose input line was edited or deleted")
    if run.repaired:
        common.say(f"{out}: removed a last line cut short by an earlier crash (its record is judged again)")
    if run.skipped:
        common.say(f"resumed: {run.skipped} of {run.total} records were already judged in {out}")
    common.say(
        f"judged {run.judged} responses: {run.correct} correct, {run.wrong} wrong, {run.errors} errors"
        + (f" ({run.retried} earlier errors retried)" if run.retried else "")
        + f"; wrote {out}"
    )
    if run.errors:
        print(f"nlft judge: {run.errors} of {run.total} records have an error instead of a verdict (their 'error' "
              f"field in {out}); rerun the same command to retry them", file=sys.stderr, flush=True)  # fmt: skip
    return run


def run(args: argparse.Namespace) -> int:
    from nlft_kernels.recipes.outputs import check_out_file, same_file
    from nlft_kernels.training.data import read_numbered_jsonl

    check_judge_flags(args)
    if not args.input.is_file():
        raise BadInput(f"--in: no such file: {args.input}")
    if same_file(args.input, args.out):
        raise BadInput(f"--out {args.out} is the input file: inputs are never rewritten; name another file")
    check_out_file(args.out)
    try:
        numbered = read_numbered_jsonl(args.input)  # the file's line numbers, blank lines counted
    except ValueError as err:
        raise BadInput(f"--in {err}") from None
    check_rows(numbered, str(args.input))
    chosen = make_judge(args)
    concurrency = args.concurrency or (8 if args.base_url else 1)
    result = judge_file(
        numbered,
        chosen,
        args.out,
        concurrency=concurrency,
        overwrite=args.overwrite,
        max_failures=args.max_consecutive_failures,
    )
    if result.errors and args.strict:
        raise StrictFailure(f"--strict: {result.errors} of {result.total} records have an error instead of a verdict")
    return 0
