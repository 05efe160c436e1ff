"""Measure the launch table of the Triton kernels: the best (BLOCK_V, num_warps) per key.

For each key of ``nlft_kernels.ops.launch.TUNED`` (family, vocabulary bucket, streams, dtype) it
times the package's own entry point (``nlft_loss`` for the row pass, ``token_logprobs`` forward
and backward for the label log-probs) with each candidate written into ``TUNED`` in turn, and
the rule's choice as the baseline; candidates keep the rule's register budget within a factor
of two. It writes JSON + Markdown under ``benchmarks/results/`` and prints the ``TUNED``
literal of the keys where a candidate beats the rule by more than ``--min-gain``: paste it into
``ops/launch.py`` (the AOT compile test then compiles those variants too).

  python -m benchmarks.tune_launch              # on a GPU (part of benchmarks.gpu_suite)
  python -m benchmarks.tune_launch --dry-run    # CPU, Triton interpreter, a tiny grid
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from benchmarks import _util

ROWS = 4096
VOCABS = (32000, 50257, 128256, 151936, 256000)
WARPS = (4, 8, 16)


def candidates(vocab: int, streams: int, dtype: torch.dtype):
    from nlft_kernels.ops.launch import MAX_BLOCK_V, MIN_BLOCK_V, LaunchConfig, heuristic_config, vocab_bucket

    rule = heuristic_config(vocab, streams, dtype)
    block = MIN_BLOCK_V
    while block <= min(MAX_BLOCK_V, vocab_bucket(vocab), 2 * rule.block_v):
        for warps in WARPS:
            if 2 <= block // (warps * 32) <= 64:  # elements per thread and stream
                yield LaunchConfig(block, warps)
        block *= 2


def make_step(family: str, rows: int, vocab: int, streams: int, dtype: torch.dtype, device: torch.device):
    """A callable running ``family`` once through the public API, and its reset."""
    import nlft_kernels

    g = torch.Generator(device=device).manual_seed(vocab + streams)
    base = torch.randn(1, rows, vocab, device=device, dtype=dtype, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (1, rows), device=device, generator=g)
    if family == "token_logprobs":

        def step():
            nlft_kernels.token_logprobs(base, labels, backend="triton", validate=False).sum().backward()

    else:
        logits = torch.randn(1, rows, vocab, device=device, dtype=dtype, generator=g)
        logprobs = torch.full((1, rows), -1.0, device=device)
        standard = logits if streams >= 2 else logprobs
        judge = logits if streams == 3 else logprobs
        correct = torch.tensor([False], device=device)

        def step():
            loss = nlft_kernels.nlft_loss(
                base, labels, correct, standard=standard, judge=judge, backend="triton", validate=False
            )
            loss.backward()

    def reset():
        base.grad = None

    return step, reset


def tune(args, device: torch.device) -> list[dict]:
    import nlft_kernels.ops.launch as launch

    # The headline case first (three logit views), so that a budget cut leaves the rest.
    keys = [("row_pass", 3), ("row_pass", 2), ("row_pass", 1), ("token_logprobs", 1)]
    deadline = _util.Deadline(args.time_budget_s)
    rows = []
    for family, streams in keys:
        for dtype in args.dtypes:
            for vocab in args.vocabs:
                if deadline.expired():
                    args.not_run.append(f"{family} streams={streams} {dtype} V={vocab}: {deadline.note()}")
                    continue
                step, reset = make_step(family, args.rows, vocab, streams, dtype, device)
                key = (family, launch.vocab_bucket(vocab), streams, str(dtype).removeprefix("torch."))
                rule = launch.heuristic_config(vocab, streams, dtype)
                timed = []
                for cfg in candidates(vocab, streams, dtype):
                    launch.TUNED[key] = cfg
                    try:
                        ms = _util.median(_util.time_ms(step, reset, device, args.warmup, args.reps))
                    except Exception as err:  # noqa: BLE001 - a candidate that does not compile or fit
                        print(f"  {key} {cfg}: {type(err).__name__}: {str(err)[:120]}")
                        continue
                    finally:
                        launch.TUNED.pop(key, None)
                    timed.append((ms, cfg))
                if not timed:
                    continue
                rule_ms = next((ms for ms, cfg in timed if cfg == rule), None)
                best_ms, best = min(timed, key=lambda t: t[0])
                rows.append(
                    {
                        "family": family,
                        "vocab": vocab,
                        "bucket": key[1],
                        "streams": streams,
                        "dtype": key[3],
                        "rule": [rule.block_v, rule.num_warps],
                        "rule_ms": rule_ms,
                        "best": [best.block_v, best.num_warps],
                        "best_ms": best_ms,
                        "candidates": [{"block_v": c.block_v, "num_warps": c.num_warps, "ms": ms} for ms, c in timed],
                    }
                )
                print(f"{key}: rule {rule} {rule_ms} ms, best {best} {best_ms:.3f} ms")
    return rows


def proposal(rows: list[dict], min_gain: float) -> str:
    """The ``TUNED`` literal of the keys whose best candidate beats the rule by ``min_gain``."""
    lines = ["TUNED: dict[tuple[str, int, int, str], LaunchConfig] = {"]
    for r in rows:
        if r["rule_ms"] is None or r["best_ms"] < (1 - min_gain) * r["rule_ms"]:
            key = (r["family"], r["bucket"], r["streams"], r["dtype"])
            lines.append(f"    {key!r}: LaunchConfig({r['best'][0]}, {r['best'][1]}),")
    lines.append("}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    out = [
        "| family | V | streams | dtype | rule (BLOCK_V, warps) | rule ms | best | best ms |",
        "|---|---:|---:|---|---|---:|---|---:|",
    ]
    for r in rows:
        rule_ms = f"{r['rule_ms']:.3f}" if r["rule_ms"] is not None else "-"
        out.append(
            f"| {r['family']} | {r['vocab']} | {r['streams']} | {r['dtype']} | {tuple(r['rule'])} | {rule_ms} "
            f"| {tuple(r['best'])} | {r['best_ms']:.3f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, a tiny grid")
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--min-gain", type=float, default=0.03, help="fraction faster than the rule to propose")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--time-budget-s", type=float, help="stop starting new keys after this many seconds")
    parser.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results/launch_<device>_<date>)")
    args = parser.parse_args(argv)
    args.dtypes, args.not_run = [getattr(torch, d) for d in args.dtypes], []
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        args.rows, args.vocabs, args.dtypes, args.warmup, args.reps = 2, [300], (torch.float32,), 0, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry_run:
        parser.error("tuning needs a GPU (use --dry-run to check the script on the CPU)")
    rows = tune(args, device)
    literal = proposal(rows, args.min_gain)
    payload = {
        "what": "launch table of the Triton kernels: each candidate (BLOCK_V, num_warps) timed through the public API",
        "command": _util.command_line("benchmarks.tune_launch", argv),
        "environment": _util.environment(device),
        "rows_per_launch": args.rows,
        "results": rows,
        "not_run": args.not_run,
        "proposed_tuned": literal,
    }
    slug = f"launch_{_util.device_slug(device)}_{_util.today()}.json"
    out = args.out or (_util.RESULTS_DIR / slug)
    _util.write_outputs(out, payload, table(rows), None)
    print("\nProposed launch table (paste into nlft_kernels/ops/launch.py):\n" + literal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
