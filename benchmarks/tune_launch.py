"""Measure the launch table of the Triton kernels: the best launch configuration per key.

For each key of ``nlft_kernels.ops.launch.TUNED`` (family, vocabulary bucket, streams, dtype) it
times the package's own entry point (``nlft_loss`` for the row pass, ``token_logprobs`` forward
and backward for the label log-probs) with each candidate written into ``TUNED`` in turn, and
the rule's choice as the baseline. A candidate sets every field of ``LaunchConfig``: BLOCK_V
(powers of two from a quarter of the rule's to twice it, its register budget), num_warps, every
boolean option both ways (an eviction hint, say), and any other option at the rule's value unless
``--option NAME=V1,V2`` lists values; so a launch option added to ``LaunchConfig`` is tuned
without a change here. It writes JSON + Markdown under ``benchmarks/results/`` and prints the ``TUNED``
literal of the keys where a candidate beats the rule by more than ``--min-gain``: paste it into
``ops/launch.py`` (the AOT compile test then compiles those variants too).

The key ``cuda_row_pass:STREAMS`` tunes the CUDA row pass (backend "cuda", sm_90) the same way:
its candidates are the blocks per row of ``launch.CUDA_TUNED`` (0: one block per row, the base
row read twice; k: the on-chip kernel, clusters of k blocks holding the row in shared memory).
With ``row_pass`` at the same shape, the results end with ``on_chip_vs_l2``: the best times of
the Triton kernel with and without its L2 eviction hints against the CUDA kernel with one block
per row and on chip, the measurement that decides how the base row's second read is kept off DRAM.

  python -m benchmarks.tune_launch              # on a GPU (part of benchmarks.gpu_suite)
  python -m benchmarks.tune_launch --dry-run    # CPU, Triton interpreter, a tiny grid
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
from pathlib import Path

import torch

from benchmarks import _util

ROWS = 4096
VOCABS = (32000, 50257, 128256, 151936, 256000)
WARPS = (4, 8, 16)
# The launch-table keys measured, as FAMILY:STREAMS; the headline case (three logit views) first, so
# that a time budget cut leaves the rest.
KEYS = ("row_pass:3", "row_pass:2", "row_pass:1", "token_logprobs:1", "cuda_row_pass:3")
# The CUDA row pass's family: candidates are blocks per row (launch.CUDA_TUNED), not LaunchConfigs.
CUDA_FAMILY = "cuda_row_pass"


def parse_key(text: str) -> tuple[str, int]:
    """``"row_pass:3"`` -> ("row_pass", 3)."""
    family, _, streams = text.partition(":")
    return family, int(streams)


def option_values(rule, options: dict[str, tuple] | None = None) -> dict[str, tuple]:
    """The values each launch option other than BLOCK_V and num_warps takes among the candidates:
    ``options``' values where given, both values of a boolean option, else the rule's value."""
    values = {}
    for f in dataclasses.fields(rule):
        if f.name in ("block_v", "num_warps"):
            continue
        given = (options or {}).get(f.name)
        current = getattr(rule, f.name)
        values[f.name] = tuple(given) if given else (False, True) if isinstance(current, bool) else (current,)
    return values


def candidates(vocab: int, streams: int, dtype: torch.dtype, options: dict[str, tuple] | None = None):
    """Every candidate configuration of a key: each BLOCK_V from a quarter to twice the rule's with each
    num_warps that gives 2 to 64 elements per thread and stream, times every combination of
    ``option_values``."""
    from nlft_kernels.ops.launch import MAX_BLOCK_V, MIN_BLOCK_V, heuristic_config, vocab_bucket

    rule = heuristic_config(vocab, streams, dtype)
    extra = option_values(rule, options)
    block = max(MIN_BLOCK_V, rule.block_v // 4)  # smaller tiles only add loop trips at these vocabularies
    while block <= min(MAX_BLOCK_V, vocab_bucket(vocab), 2 * rule.block_v):
        for warps in WARPS:
            if 2 <= block // (warps * 32) <= 64:  # elements per thread and stream
                for combo in itertools.product(*extra.values()):
                    yield dataclasses.replace(
                        rule, block_v=block, num_warps=warps, **dict(zip(extra, combo, strict=True))
                    )
        block *= 2


def cuda_device(device: torch.device | None):
    """The ``launch.CudaDevice`` of a CUDA ``device``; Hopper's for the CPU (a plan, a dry run)."""
    from nlft_kernels.ops.launch import HOPPER, CudaDevice

    return CudaDevice.of(device.index or 0) if device is not None and device.type == "cuda" else HOPPER


def cuda_unavailable(device: torch.device) -> str | None:
    """Why the CUDA row pass's candidates cannot be timed on ``device``, or None."""
    from nlft_kernels.backends import unavailable

    why = unavailable("cuda", device)
    if why is not None:
        return f"backend 'cuda' {why}"
    gpu = cuda_device(device)
    if gpu.capability < (9, 0):
        return f"the on-chip kernel needs sm_90 (thread-block clusters); this GPU is {gpu.arch}"
    return None


@dataclasses.dataclass(frozen=True)
class Tunable:
    """One launch table as the tuner fills it: ``table`` (launch.TUNED or launch.CUDA_TUNED),
    the entry's ``key``, its ``candidates`` and the ``rule``'s choice, and ``fields`` giving a
    candidate as the JSON records it."""

    table: dict
    key: tuple
    candidates: list
    rule: object
    fields: object


def tunable(
    family: str, vocab: int, streams: int, dtype: torch.dtype, options: dict | None, device: torch.device | None = None
) -> Tunable:
    import nlft_kernels.ops.launch as launch

    bucket, name = launch.vocab_bucket(vocab), str(dtype).removeprefix("torch.")
    if family == CUDA_FAMILY:
        # One block per row (0), then every cluster size whose slices fit a block's shared
        # memory on ``device`` (Hopper's for a plan or a dry run on the CPU).
        gpu = cuda_device(device)
        return Tunable(
            launch.CUDA_TUNED, launch.cuda_tuned_key(gpu, vocab, streams, dtype),
            [0, *launch.on_chip_clusters(vocab, dtype, gpu)], 0, lambda blocks: {"blocks_per_row": blocks},
        )  # fmt: skip
    return Tunable(
        launch.TUNED, (family, bucket, streams, name), list(candidates(vocab, streams, dtype, options)),
        launch.heuristic_config(vocab, streams, dtype), dataclasses.asdict,
    )  # fmt: skip


def make_step(family: str, rows: int, vocab: int, streams: int, dtype: torch.dtype, device: torch.device):
    """A callable running ``family`` once through the public API, and its reset."""
    import nlft_kernels

    backend = "cuda" if family == CUDA_FAMILY else "triton"

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
                base, labels, correct, standard=standard, judge=judge, backend=backend, validate=False
            )
            loss.backward()

    def reset():
        base.grad = None

    return step, reset


def tune(args, device: torch.device) -> list[dict]:
    from nlft_kernels.ops.launch import vocab_bucket

    keys = [parse_key(k) for k in args.keys]
    deadline = _util.Deadline(args.time_budget_s)
    rows = []
    for family, streams in keys:
        if family == CUDA_FAMILY and (why := cuda_unavailable(device)) is not None:
            args.not_run.append(f"{family} streams={streams}: {why}")
            continue
        for dtype in args.dtypes:
            for vocab in args.vocabs:
                if deadline.expired():
                    args.not_run.append(f"{family} streams={streams} {dtype} V={vocab}: {deadline.note()}")
                    continue
                step, reset = make_step(family, args.rows, vocab, streams, dtype, device)
                t = tunable(family, vocab, streams, dtype, args.options, device)
                timed = []
                for cfg in t.candidates:
                    t.table[t.key] = cfg
                    try:
                        ms = _util.median(_util.time_ms(step, reset, device, args.warmup, args.reps))
                    except Exception as err:  # noqa: BLE001 - a candidate that does not compile or fit
                        print(f"  {t.key} {cfg}: {type(err).__name__}: {str(err)[:120]}")
                        continue
                    finally:
                        t.table.pop(t.key, None)
                    timed.append((ms, cfg))
                if not timed:
                    continue
                rule_ms = next((ms for ms, cfg in timed if cfg == t.rule), None)
                best_ms, best = min(timed, key=lambda pair: pair[0])
                rows.append(
                    {
                        "family": family,
                        "vocab": vocab,
                        "bucket": vocab_bucket(vocab),
                        "streams": streams,
                        "dtype": str(dtype).removeprefix("torch."),
                        "rule": t.fields(t.rule),
                        "rule_ms": rule_ms,
                        "best": t.fields(best),
                        "best_ms": best_ms,
                        "candidates": [t.fields(c) | {"ms": ms} for ms, c in timed],
                    }
                    | ({"arch": t.key[0]} if family == CUDA_FAMILY else {})
                )
                print(f"{t.key}: rule {t.rule} {rule_ms} ms, best {best} {best_ms:.3f} ms")
    return rows


def _fastest(candidates: list[dict], keep) -> dict | None:
    """The fastest of the timed ``candidates`` that ``keep`` accepts, or None."""
    kept = [c for c in candidates if keep(c)]
    return min(kept, key=lambda c: c["ms"]) if kept else None


def on_chip_vs_l2(rows: list[dict]) -> list[dict]:
    """Per shape timed by both ``row_pass`` and ``cuda_row_pass``: the best ms of the Triton
    kernel with its eviction hints and without, of the CUDA kernel with one block per row and on
    chip (with its cluster size), and which of the four is fastest."""
    out = []
    for r in rows:
        shape = (r["vocab"], r["streams"], r["dtype"])
        cuda = [c for c in rows if c["family"] == CUDA_FAMILY and (c["vocab"], c["streams"], c["dtype"]) == shape]
        if r["family"] != "row_pass" or not cuda:
            continue
        found = {
            "triton_l2_hints": _fastest(r["candidates"], lambda c: c.get("evict") is True),
            "triton_no_hints": _fastest(r["candidates"], lambda c: c.get("evict") is False),
            "cuda_one_block": _fastest(cuda[0]["candidates"], lambda c: c["blocks_per_row"] == 0),
            "cuda_on_chip": _fastest(cuda[0]["candidates"], lambda c: c["blocks_per_row"] > 0),
        }
        timed = {way: c["ms"] for way, c in found.items() if c is not None}
        on_chip = found["cuda_on_chip"]
        out.append(
            {
                "vocab": shape[0], "streams": shape[1], "dtype": shape[2],
                **{f"{way}_ms": timed.get(way) for way in found},
                "on_chip_blocks": on_chip["blocks_per_row"] if on_chip else None,
                "fastest": min(timed, key=timed.get) if timed else None,
            }
        )  # fmt: skip
    return out


def proposal(rows: list[dict], min_gain: float) -> str:
    """The ``TUNED`` and ``CUDA_TUNED`` literals of the keys whose best candidate beats the rule
    by ``min_gain``."""
    triton = ["TUNED: dict[tuple[str, int, int, str], LaunchConfig] = {"]
    cuda = ["CUDA_TUNED: dict[tuple[str, int, int, str], int] = {"]
    for r in rows:
        if r["rule_ms"] is None or r["best_ms"] < (1 - min_gain) * r["rule_ms"]:
            if r["family"] == CUDA_FAMILY:
                cuda.append(
                    f"    {(r['arch'], r['bucket'], r['streams'], r['dtype'])!r}: {r['best']['blocks_per_row']},"
                )
            else:
                key = (r["family"], r["bucket"], r["streams"], r["dtype"])
                triton.append(f"    {key!r}: {config_literal(r['best'])},")
    return "\n".join([*triton, "}", *cuda, "}"])


def config_literal(fields: dict) -> str:
    """``LaunchConfig(block_v=..., num_warps=..., ...)`` of a result's configuration."""
    return "LaunchConfig(" + ", ".join(f"{name}={value!r}" for name, value in fields.items()) + ")"


def table(rows: list[dict], decision: list[dict] | None = None) -> str:
    out = [
        "| family | V | streams | dtype | rule | rule ms | best | best ms | candidates |",
        "|---|---:|---:|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        rule_ms = f"{r['rule_ms']:.3f}" if r["rule_ms"] is not None else "-"
        rule, best = (", ".join(f"{k}={v}" for k, v in r[which].items()) for which in ("rule", "best"))
        out.append(
            f"| {r['family']} | {r['vocab']} | {r['streams']} | {r['dtype']} | {rule} | {rule_ms} "
            f"| {best} | {r['best_ms']:.3f} | {len(r['candidates'])} |"
        )
    if decision:
        ms = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        out += [
            "",
            "The base row's second read: L2 hints (Triton) against on chip (CUDA clusters), best ms of each:",
            "",
            "| V | streams | dtype | Triton, L2 hints | Triton, no hints | CUDA, one block "
            "| CUDA, on chip (blocks) | fastest |",
            "|---:|---:|---|---:|---:|---:|---:|---|",
        ]
        for d in decision:
            out.append(
                f"| {d['vocab']} | {d['streams']} | {d['dtype']} | {ms(d['triton_l2_hints_ms'])} "
                f"| {ms(d['triton_no_hints_ms'])} | {ms(d['cuda_one_block_ms'])} "
                f"| {ms(d['cuda_on_chip_ms'])} ({d['on_chip_blocks']}) | {d['fastest']} |"
            )
    return "\n".join(out)


def parse_option(text: str) -> tuple[str, tuple]:
    """``"num_stages=2,3"`` -> ("num_stages", (2, 3)): values as Python literals (ints, True/False)."""
    import ast

    name, _, values = text.partition("=")
    if not name or not values:
        raise argparse.ArgumentTypeError(f"--option takes NAME=V1,V2, got {text!r}")
    return name, tuple(ast.literal_eval(v) for v in values.split(","))


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
    parser.add_argument("--keys", nargs="+", default=list(KEYS), help=f"FAMILY:STREAMS keys (default {' '.join(KEYS)})")
    parser.add_argument(
        "--option",
        type=parse_option,
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="values of a LaunchConfig option to try (booleans are tried both ways without it)",
    )
    parser.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results/launch_<device>_<date>)")
    args = parser.parse_args(argv)
    args.dtypes, args.not_run, args.options = [getattr(torch, d) for d in args.dtypes], [], dict(args.option)
    from nlft_kernels.ops.launch import LaunchConfig

    if unknown := set(args.options) - {f.name for f in dataclasses.fields(LaunchConfig)}:
        parser.error(f"--option: LaunchConfig has no field {sorted(unknown)}")
    if bad := [k for k in args.keys if parse_key(k) not in {parse_key(known) for known in KEYS}]:
        parser.error(f"--keys: {bad} are not among {' '.join(KEYS)}")
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        args.rows, args.vocabs, args.dtypes, args.warmup, args.reps = 2, [300], (torch.float32,), 0, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry_run:
        parser.error("tuning needs a GPU (use --dry-run to check the script on the CPU)")
    rows = tune(args, device)
    literal = proposal(rows, args.min_gain)
    decision = on_chip_vs_l2(rows)
    payload = {
        "what": "launch table of the Triton kernels: each candidate LaunchConfig timed through the public API",
        "command": _util.command_line("benchmarks.tune_launch", argv),
        "environment": _util.environment(device),
        "rows_per_launch": args.rows,
        "results": rows,
        "not_run": args.not_run,
        "proposed_tuned": literal,
        "on_chip_vs_l2": decision,
    }
    slug = f"launch_{_util.device_slug(device)}_{_util.today()}.json"
    out = args.out or (_util.RESULTS_DIR / slug)
    _util.write_outputs(out, payload, table(rows, decision), None)
    print("\nProposed launch tables (paste into nlft_kernels/ops/launch.py):\n" + literal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
