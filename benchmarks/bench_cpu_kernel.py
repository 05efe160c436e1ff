"""How fast is the compiled NLFT row pass (nlft_kernels._C) against the other paths?

CPU mode (default without a GPU): forward+backward of the whole NLFT loss with the C++ kernel
(backend "cpp") and with the chunked torch path (backend "torch"), against one
``F.cross_entropy`` on the base view, the cost NLFT is measured against (issue #4's target:
the NLFT loss costs at most 1.5x one cross-entropy).

GPU mode (``--gpu``, needs CUDA): the CUDA kernel (backend "cuda") against Triton ("triton"),
V in {32000, 128256}, N in {1024, 8192}, with the achieved bandwidth as a fraction of the
measured copy bandwidth. Its results are what ``GPU_CHOICE`` in nlft_kernels/backends.py is
filled from.

Inputs are benchmarks.bench_loss's (correct and wrong samples mixed, saliency, unlikelihood and
killed samples present, padding). Run from the repository root:
  python -m benchmarks.bench_cpu_kernel --quick      # CPU, V = 32000 and 128256 (a few minutes)
  python -m benchmarks.bench_cpu_kernel --gpu        # GPU grid
Writes benchmarks/results/cpu_kernel_<device>_<date>.json (``--out`` to change) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from benchmarks import _util
from benchmarks.bench_loss import DTYPES, Shape, build_case, make_batch
from nlft_kernels import backends
from nlft_kernels.extension import extension

CPU_CASES = ("cpp", "torch", "cross_entropy")
GPU_CASES = ("cuda", "triton", "cross_entropy")
# (N, V) per grid; the CPU grids keep N * V near or below 64 M logits per view (four views'
# worth of memory fits a shared machine).
QUICK_SHAPES = ((1024, 32000), (256, 128256))
CPU_SHAPES = ((1024, 32000), (4096, 32000), (256, 128256), (1024, 128256))
GPU_SHAPES = tuple((n, v) for v in (32000, 128256) for n in (1024, 8192))
TARGET_RATIO = 1.5  # NLFT loss / one cross-entropy, forward+backward

METHOD = {
    "timing": (
        "forward+backward of one loss per call, .grad dropped before each call; median over --reps "
        "calls after --warmup untimed ones; "
    )
    + _util.TIMING,
    "cases": (
        "cpp / cuda / triton / torch: nlft_kernels.nlft_loss(base [N, V] with gradient, standard and "
        "judge [N, V] logits without, sample_ids) with that backend; cross_entropy: "
        "F.cross_entropy(base, labels) on the same base view"
    ),
    "ratio_to_cross_entropy": "median time of the case / median time of cross_entropy, same shape and dtype",
    "bandwidth": (
        "bytes_moved = what the fused row pass moves (benchmarks._util.nlft_row_pass_bytes: 2 teacher "
        "views read once, the base view twice, the gradient written once, plus per-row scalars; "
        "cross_entropy: no teacher view) / median time, and its fraction of the measured "
        "dst.copy_(src) bandwidth (read + write bytes / time)"
    ),
}


def bytes_moved(case: str, n: int, vocab: int, dtype: str) -> int:
    """Bytes of the fused row pass of ``case``'s job (the gradient in the logits dtype)."""
    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return _util.nlft_row_pass_bytes(n, vocab, elem, 0 if case == "cross_entropy" else 2, elem)


def row_bandwidth(row: dict, copy_bytes_per_s: float | None) -> dict:
    """The bandwidth fields of a row, computed from its shape and time (older results render too)."""
    return _util.bandwidth(
        bytes_moved(row["case"], row["n"], row["vocab"], row["dtype"]), row["median_ms"], copy_bytes_per_s
    )


def build_step(case: str, batch, shape: Shape):
    """(step, reset) of one case: bench_loss's nlft_kernels case with backend ``case``, or its
    cross_entropy case."""
    if case == "cross_entropy":
        return build_case("cross_entropy", batch, shape)
    return build_case("nlft_kernels", batch, shape, backend=case)


def run(args, argv: list[str]) -> dict:
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = args.cases or (GPU_CASES if args.gpu else CPU_CASES)
    shapes = args.shapes or (GPU_SHAPES if args.gpu else QUICK_SHAPES if args.quick else CPU_SHAPES)
    copy_bw, copy_bytes = _util.measured_copy_bandwidth(device)
    load_before = os.getloadavg()
    not_run: list[dict] = []

    def head(shape: Shape, batch=None) -> dict:
        return {"n": shape.n, "vocab": shape.vocab, "dtype": shape.dtype}

    def measure_case(case: str, shape: Shape, batch) -> dict:
        step, reset = build_step(case, batch, shape)
        return _util.measure(step, reset, device, args.warmup, args.reps, peak_memory=False)

    rows = _util.run_grid(
        [Shape(n, vocab, dtype, args.rows_per_sample) for dtype in args.dtype for n, vocab in shapes],
        list(cases),
        device,
        make_batch=lambda shape: make_batch(shape, device, args.seed),
        head=head,
        measure_case=measure_case,
        finish=lambda case, shape, row: row_bandwidth(row, copy_bw),
        deadline=_util.Deadline(args.time_budget_s),
        not_run=not_run,
        not_run_of=head,
    )
    ce = {(r["n"], r["vocab"], r["dtype"]): r.get("median_ms") for r in rows if r["case"] == "cross_entropy"}
    for r in rows:
        base = ce.get((r["n"], r["vocab"], r["dtype"]))
        r["ratio_to_cross_entropy"] = r["median_ms"] / base if base and r["status"] == "ok" else None
    module, _ = extension()
    settings = {
        "warmup": args.warmup,
        "reps": args.reps,
        "seed": args.seed,
        "rows_per_sample": args.rows_per_sample,
        "cases": list(cases),
        "time_budget_s": args.time_budget_s,
    }
    question = "the compiled NLFT row pass against the chunked torch path / Triton and one cross-entropy"
    header = _util.payload_header(
        "bench_cpu_kernel", question, device, "benchmarks.bench_cpu_kernel", argv, settings, METHOD
    )
    return (
        header
        | {
            "cpu_kernel": module.cpu_capability() if module is not None else None,
            "backends": backends(),
            # Other processes on a shared machine inflate CPU timings; the load average shows how much.
            "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
            "copy_bandwidth_bytes_per_s": copy_bw,
            "copy_bandwidth_buffer_bytes": copy_bytes,
            "target": {"nlft_over_cross_entropy_at_most": TARGET_RATIO},
            "cases": rows,
            # Shapes the time budget left out (their cases are not in "cases").
            "not_run": not_run,
        }
        | ({"gpu_choice": propose_gpu_choice({"cases": rows})} if args.gpu else {})
    )


def markdown_table(payload: dict) -> str:
    copy_bw = payload.get("copy_bandwidth_bytes_per_s")
    copy_text = f"copy bandwidth {copy_bw / 1e9:.1f} GB/s" if copy_bw else "copy bandwidth not measured"
    lines = [
        f"Device: {payload['device']} ({payload['device_type']}, {payload['cpu_threads']} threads); "
        f"torch {payload['versions']['torch']}; {copy_text}",
        "",
        *_util.table_head(
            ["N", "V", "dtype", "case", "median ms", "x cross_entropy", "GB/s", "% of copy BW"],
            numeric={"N", "V", "median ms", "x cross_entropy", "GB/s", "% of copy BW"},
        ),
    ]
    for r in payload["cases"]:
        if r.get("status", "ok") != "ok":  # results written before rows had a status were all measured
            lines.append(_util.unmeasured_cells(f"| {r['n']} | {r['vocab']} | {r['dtype']} | {r['case']} |", r, 60, 3))
            continue
        ratio = f"{r['ratio_to_cross_entropy']:.2f}" if r.get("ratio_to_cross_entropy") is not None else "-"
        lines.append(
            f"| {r['n']} | {r['vocab']} | {r['dtype']} | {r['case']} | {r['median_ms']:.1f} | {ratio} | "
            f"{_util.bandwidth_cells(row_bandwidth(r, copy_bw))} |"
        )
    lines += _util.not_run_lines(payload, lambda s: f"{s['n']}x{s['vocab']} {s['dtype']}")
    if literal := payload.get("gpu_choice", {}).get("literal"):
        lines += ["", f"Proposed ({GPU_CHOICE_RULE}), for nlft_kernels/backends.py:", "", "```python", literal, "```"]
    return "\n".join(lines)


# --gpu proposes nlft_kernels.backends.GPU_CHOICE from its timings: CUDA must beat Triton by more
# than this (timing noise) to be chosen; "any larger shape" is this limit.
CUDA_MARGIN = 0.03
UNBOUNDED = 2**31 - 1

GPU_CHOICE_RULE = (
    "per measured (N, V): geometric mean over dtypes of cuda / triton median time; cuda where it is below "
    f"{1 - CUDA_MARGIN:.2f}, else triton; each N covers the rows up to it (the largest: all rows), each V the "
    "vocabularies up to it (the largest: all)"
)


def propose_gpu_choice(payload: dict, default: str = "triton") -> dict:
    """GPU_CHOICE entries (max rows N, max vocabulary V, backend) from bench_cpu_kernel --gpu.

    Per measured (N, V): the geometric mean over dtypes of CUDA's median time over Triton's;
    CUDA wins where that is below 1 - CUDA_MARGIN (Triton, the default, keeps ties). A shape takes
    the first entry whose limits hold (backends.gpu_choice), so per vocabulary, from the smallest,
    each measured N covers the rows up to it and the largest covers all rows beyond; the largest
    vocabulary covers every larger one. Consecutive entries with one backend merge, trailing
    entries of the default go (the default takes what no entry holds), and where CUDA wins
    nowhere the proposal is ``()``.
    """
    times: dict[tuple[int, int, str], dict[str, float]] = {}
    for row in payload["cases"]:
        if row.get("median_ms") is not None and row["case"] in ("cuda", "triton"):
            times.setdefault((row["n"], row["vocab"], row["dtype"]), {})[row["case"]] = row["median_ms"]
    ratios: dict[tuple[int, int], dict[str, float]] = {}
    for (n, vocab, dtype), by_case in times.items():
        if {"cuda", "triton"} <= set(by_case):
            ratios.setdefault((n, vocab), {})[dtype] = by_case["cuda"] / by_case["triton"]
    points = []
    for (n, vocab), by_dtype in sorted(ratios.items(), key=lambda item: (item[0][1], item[0][0])):
        geo = math.exp(sum(math.log(r) for r in by_dtype.values()) / len(by_dtype))
        winner = "cuda" if geo < 1 - CUDA_MARGIN else default
        points.append({"n": n, "vocab": vocab, "cuda_over_triton": by_dtype, "geomean": geo, "backend": winner})
    if not points:
        return {"proposal": None, "reason": "no shape has both a cuda and a triton timing", "points": []}
    vocabs = sorted({p["vocab"] for p in points})
    entries: list[tuple[int, int, str]] = []
    for vocab in vocabs:
        group = [p for p in points if p["vocab"] == vocab]
        max_vocab = UNBOUNDED if vocab == vocabs[-1] else vocab
        for i, p in enumerate(group):
            max_rows = UNBOUNDED if i == len(group) - 1 else p["n"]
            if entries and entries[-1][1] == max_vocab and entries[-1][2] == p["backend"]:
                entries[-1] = (max_rows, max_vocab, p["backend"])
            else:
                entries.append((max_rows, max_vocab, p["backend"]))
    while entries and entries[-1][2] == default:
        entries.pop()
    if all(e[2] == default for e in entries):
        entries = []
    return {
        "proposal": [list(e) for e in entries],
        "literal": gpu_choice_literal(entries),
        "rule": GPU_CHOICE_RULE,
        "margin": CUDA_MARGIN,
        "points": points,
    }


def gpu_choice_literal(entries: list[tuple[int, int, str]]) -> str:
    """The assignment to paste into nlft_kernels/backends.py."""
    if not entries:
        return "GPU_CHOICE: tuple[tuple[int, int, str], ...] = ()"
    body = "".join(f"    ({r}, {v}, {b!r}),\n" for r, v, b in entries).replace("'", '"')
    return f"GPU_CHOICE: tuple[tuple[int, int, str], ...] = (\n{body})"


def _shape(text: str) -> tuple[int, int]:
    n, vocab = text.lower().split("x")
    return int(n), int(vocab)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_cpu_kernel", description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help=f"CUDA against Triton on {GPU_SHAPES}")
    p.add_argument("--quick", action="store_true", help=f"CPU shapes {QUICK_SHAPES} (default {CPU_SHAPES})")
    p.add_argument("--shapes", type=_shape, nargs="+", help="NxV shapes, e.g. 1024x32000 (overrides the grid)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--cases", nargs="+", choices=sorted(set(CPU_CASES + GPU_CASES)))
    p.add_argument("--rows-per-sample", type=int, default=128)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's")
    p.add_argument("--warmup", type=int, help="untimed calls per case (default: 5 on CUDA, 1 on CPU)")
    p.add_argument("--reps", type=int, help="timed calls per case (default: 50 on CUDA, 7 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/cpu_kernel_<device>_<date>.json)")
    p.add_argument(
        "--time-budget-s",
        type=float,
        help="start no shape after this many seconds; what is left out is recorded (benchmarks.gpu_suite)",
    )
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else 5 if args.gpu else 1
    args.reps = args.reps if args.reps is not None else 50 if args.gpu else 7
    for n, _ in args.shapes or ():
        if n % args.rows_per_sample:
            raise SystemExit(f"N = {n} is not a multiple of --rows-per-sample {args.rows_per_sample}")
    return args


def write(args, payload: dict) -> Path:
    out = _util.result_path(args.out, "cpu_kernel", torch.device(payload["device_type"]))
    return _util.write_run(out, payload, markdown_table(payload), None)


def main(argv: list[str] | None = None) -> Path:
    return _util.script_main(argv, parse_args, None, run, write)


if __name__ == "__main__":
    main()
