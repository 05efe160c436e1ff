"""How fast is the fused NLFT loss, and how much memory does it need, against what users run today?

Forward+backward of each case on the same inputs (B samples x T rows, flattened to N rows of
V logits per view; correct and wrong samples mixed, with saliency, unlikelihood and killed
samples present):

  nlft_kernels        ``nlft_kernels.nlft_loss``, backend "auto" (Triton on CUDA; on the CPU the
                      C++ kernel of nlft_kernels._C when it is built, else chunked torch); the
                      teacher views carry no gradient
  authors_style       ``benchmarks.authors_style``: the three views as one [3, N, V] batch with
                      gradient and full float32 softmaxes, as in the authors' training code
  reference           ``nlft_kernels.reference.nlft_loss_reference`` in float32, eager
  compiled_reference  the same under ``torch.compile``
  cross_entropy       one ``F.cross_entropy`` on the base view: the lower bound
  compiled_cross_entropy_x3
                      ``torch.compile(F.cross_entropy)`` once per view (base with gradient, the
                      teachers under no_grad): what torch.compile makes of three cross-entropies
  liger_cross_entropy_x3
                      Liger-Kernel's fused cross-entropy once per view (base with gradient, the
                      teachers under no_grad): what a user gets by calling a fused cross-entropy
                      three times; CUDA with liger-kernel installed only (skipped otherwise). It
                      overwrites its input with the gradient, so it runs last on each shape.

Every row also gives the achieved bandwidth, as quack reports its kernels: the bytes the fused
row pass moves for the shape (``_util.nlft_row_pass_bytes``) over the case's time, in GB/s and
as a share of the measured copy bandwidth.

Run from the repository root:
  python -m benchmarks.bench_loss --quick     # CPU-sized grid (a few minutes on 2 cores)
  python -m benchmarks.bench_loss             # full GPU grid
Writes benchmarks/results/bench_loss-<device>-<date>.json (``--out`` to change), a PNG next to
it (matplotlib) and the Markdown table (printed, and written next to it as .md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import _util
from benchmarks.authors_style import authors_style_loss
from benchmarks.plot import plot_results
from nlft_kernels import NLFTConfig, backends, nlft_loss
from nlft_kernels.reference import nlft_loss_reference

LIGER = "liger_cross_entropy_x3"
COMPILED_CE = "compiled_cross_entropy_x3"
CASES = ("nlft_kernels", "authors_style", "reference", "compiled_reference", "cross_entropy", COMPILED_CE, LIGER)
DTYPES = _util.DTYPES

QUICK_GRID = {"n": (512, 2048), "vocab": (4096, 32000), "dtype": ("float32", "bfloat16")}
FULL_GRID = {"n": (1024, 8192, 16384), "vocab": (32000, 128256, 151936), "dtype": ("bfloat16", "float32")}
TINY_GRID = {"n": (64,), "vocab": (1000,), "dtype": ("float32",)}
GRIDS = {"tiny": TINY_GRID, "quick": QUICK_GRID, "full": FULL_GRID}

# Teacher views given as logits in each case's job: the NLFT cases compute the loss of three
# [N, V] views (base, standard, judge), cross-entropy one view.
TEACHER_LOGIT_VIEWS = {case: 2 for case in CASES} | {"cross_entropy": 0}


def bytes_moved(case: str, n: int, vocab: int, dtype: str) -> int:
    """The bytes the fused row pass moves for ``case``'s job on an N x V shape
    (``_util.nlft_row_pass_bytes``; the gradient in the logits dtype): the same count for every
    case computing the NLFT loss, so their achieved bandwidths compare as their times do."""
    elem = Shape(n, vocab, dtype, 1).elem
    return _util.nlft_row_pass_bytes(n, vocab, elem, TEACHER_LOGIT_VIEWS[case], elem)


def row_bandwidth(row: dict, copy_bytes_per_s: float | None) -> dict:
    """The bandwidth fields of a measured row, from its shape and median time (computed, not
    read, so that results written before these fields existed render the same way)."""
    moved = bytes_moved(row["case"], row["n"], row["vocab"], row["dtype"])
    return _util.bandwidth(moved, row["median_ms"], copy_bytes_per_s)


METHOD = {
    "timing": (
        "forward+backward of one loss per call, .grad dropped before each call; median over --reps "
        "calls after --warmup untimed ones; "
        + _util.TIMING
        + "; on the CPU each case in a fresh subprocess (a compiled case leaves OpenMP threads spinning "
        "that slow whatever runs after it in the same process)"
    ),
    "memory_cuda": (
        "torch.cuda.max_memory_allocated during one call after reset_peak_memory_stats, minus "
        "memory_allocated before it: bytes beyond the inputs, the gradient written included"
    ),
    "memory_cpu": (
        "each case in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536 (glibc unmaps freed "
        "buffers so RSS follows live tensors); after one warm-up call (and compilation) the RSS "
        "high-water mark is reset through /proc/self/clear_refs, and the peak RSS (VmHWM) of one "
        "call minus the RSS just before it is reported: bytes beyond the inputs, the gradient "
        "written included, plus any allocator or runtime growth"
    ),
    "bandwidth": (
        "bytes_moved = what the fused NLFT row pass moves for the shape (benchmarks._util."
        "nlft_row_pass_bytes: each of the 2 teacher views read once, the base view twice, the "
        "gradient written once, N V elem (2 + 2) + N V elem + per-row scalars; cross_entropy: "
        "the same with no teacher view, N V elem (2 + 0) + N V elem), the same for every NLFT case; "
        "achieved bytes/s = bytes_moved / median time, and its fraction of the measured "
        "dst.copy_(src) bandwidth (read + write bytes / time)"
    ),
    "inputs": (
        "B = N / T samples of T rows; sample kinds cycle correct / wrong with saliency on 25% of "
        "rows (killed by the 6% rule) / wrong with one saliency row / wrong without; correct "
        "samples have p_s > 0.95 on ~35% of rows; the last (b mod 3) rows of sample b are padding; "
        "no hidden states (no clusters)"
    ),
}


@dataclass(frozen=True)
class Shape(_util.RowShape):
    n: int
    vocab: int
    dtype: str
    rows_per_sample: int


@dataclass
class Batch:
    """The inputs of one shape: views [3, N, V] (base, standard, judge), labels [N],
    sample_ids [N], correct [B]."""

    views: torch.Tensor
    labels: torch.Tensor
    sample_ids: torch.Tensor
    correct: torch.Tensor


def make_batch(shape: Shape, device: torch.device, seed: int = 0) -> Batch:
    """Random views built in place on ``device`` (no [N, V] temporaries) so big shapes fit; the
    rows (labels, samples, lifted rows) are the harness's ``nlft_rows``."""
    n, vocab = shape.n, shape.vocab
    g = torch.Generator(device=device).manual_seed(seed)
    views = torch.randn(3, n, vocab, generator=g, device=device, dtype=DTYPES[shape.dtype])
    views[0].mul_(2)
    views[1:].add_(views[0])  # the teachers are the base view plus noise
    rows = _util.nlft_rows(n, shape.rows_per_sample, vocab, g, device)
    labels = rows.labels
    # Correct samples: lift the standard view's label above every other logit by log V + 6,
    # so p_s > 1 / (1 + e^-6) > 0.95 on those rows.
    lift = rows.lift_standard.nonzero().squeeze(1)
    top = views[1].amax(dim=-1)
    views[1, lift, labels[lift]] = (top[lift] + math.log(vocab) + 6).to(views.dtype)
    # Wrong samples: lift the judge view's label so that r1, r2 and p_j pass the saliency test.
    lift = rows.lift_judge.nonzero().squeeze(1)
    views[2, lift, labels[lift]] += math.log(vocab) + 4
    return Batch(views=views, labels=rows.labels, sample_ids=rows.sample_ids, correct=rows.correct)


def build_case(
    case: str, batch: Batch, shape: Shape, backend: str = "auto"
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(step, reset): ``step`` runs forward+backward of ``case`` (nlft_kernels: with ``backend``);
    ``reset`` drops the gradient."""
    views, labels, b, t = batch.views, batch.labels, shape.batch, shape.rows_per_sample
    leaf = views.detach()[0] if case != "authors_style" else views.detach()
    leaf.requires_grad_()

    def reset() -> None:
        leaf.grad = None

    if case == "nlft_kernels":

        def step() -> None:
            nlft_loss(
                leaf,
                labels,
                batch.correct,
                standard=views[1],
                judge=views[2],
                sample_ids=batch.sample_ids,
                backend=backend,
            ).backward()
    elif case == "authors_style":

        def step() -> None:
            authors_style_loss(leaf.view(3, b, t, -1), labels.view(b, t), batch.correct).backward()
    elif case in ("reference", "compiled_reference"):
        reference = nlft_loss_reference
        if case == "compiled_reference":
            # A fresh compilation per shape: dynamo's per-function recompile limit would otherwise
            # send later shapes of a long grid to eager mode without a word.
            torch._dynamo.reset()
            reference = torch.compile(nlft_loss_reference, dynamic=False)

        def step() -> None:
            reference(
                leaf.view(b, t, -1),
                labels.view(b, t),
                batch.correct,
                views[1].view(b, t, -1),
                views[2].view(b, t, -1),
                dtype=torch.float32,
            ).backward()
    elif case == "cross_entropy":

        def step() -> None:
            F.cross_entropy(leaf, labels).backward()
    elif case == COMPILED_CE:
        torch._dynamo.reset()  # as compiled_reference: a fresh compilation per shape
        cross_entropy = torch.compile(F.cross_entropy, dynamic=False)

        def step() -> None:
            with torch.no_grad():
                cross_entropy(views[1], labels)
                cross_entropy(views[2], labels)
            cross_entropy(leaf, labels).backward()
    elif case == LIGER:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss()

        def step() -> None:
            with torch.no_grad():
                liger(views[1], labels)
                liger(views[2], labels)
            liger(leaf, labels).backward()
    else:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    return step, reset


def liger_unavailable(device: torch.device) -> str | None:
    """Why Liger-Kernel's cross-entropy cannot run here, or None."""
    if device.type != "cuda":
        return "Liger-Kernel's Triton kernels need CUDA"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def measure_case(case: str, batch: Batch, shape: Shape, device: torch.device, args) -> dict:
    """Time (and on CUDA, peak memory) of one case in this process; status ``ok`` or ``skipped``."""
    if case == LIGER and (why := liger_unavailable(device)):
        return {"case": case, "status": "skipped", "note": why}
    step, reset = build_case(case, batch, shape)
    if case in ("compiled_reference", COMPILED_CE):
        try:  # compilation happens at the first call; a machine without a compiler skips the case
            reset()
            step()
        except Exception as error:  # noqa: BLE001 - any compiler failure means "cannot compile here"
            if _util.is_oom(error):
                raise
            note = f"torch.compile failed: {type(error).__name__}: {error}"[:300]
            return {"case": case, "status": "skipped", "note": note}
    return {"case": case} | _util.measure(step, reset, device, args.warmup, args.reps)


def probe_main(spec: str) -> None:
    """The subprocess side of ``_util.probe``: prints the time fields (``what="time"``) or the peak
    extra RSS (``"memory"``, see METHOD["memory_cpu"]) of one case as JSON."""
    spec = json.loads(spec)
    shape, cpu = Shape(**spec["shape"]), torch.device("cpu")
    batch = make_batch(shape, cpu, spec["seed"])
    if spec["what"] == "time":
        args = argparse.Namespace(warmup=spec["warmup"], reps=spec["reps"])
        print(json.dumps(measure_case(spec["case"], batch, shape, cpu, args)))
    else:
        print(json.dumps({"peak_extra_bytes": _util.cpu_peak_extra(*build_case(spec["case"], batch, shape))}))


def measure_cpu(case: str, shape: Shape, batch: Batch | None, args) -> dict:
    """Time, then peak extra RSS, of one case on the CPU: each in a fresh subprocess (a compiled case
    leaves OpenMP worker threads spinning that would slow the cases timed after it in the same
    process, and RSS needs an allocator that returns freed buffers), or here with --in-process."""
    if args.in_process:
        row = measure_case(case, batch, shape, torch.device("cpu"), args)
        if row["status"] == "ok":
            row["peak_extra_bytes"] = _util.cpu_peak_extra(*build_case(case, batch, shape))
        return row
    spec = {"case": case, "shape": asdict(shape), "seed": args.seed, "warmup": args.warmup, "reps": args.reps}
    row = _util.probe("benchmarks.bench_loss", spec | {"what": "time"}, memory=False, what=f"time of {case} {shape}")
    if row["status"] == "ok":
        row |= _util.probe("benchmarks.bench_loss", spec | {"what": "memory"}, True, f"memory of {case} {shape}")
    return row


def grid(args) -> list[Shape]:
    axes = _util.grid_axes(args, GRIDS, ("n", "vocab", "dtype"))
    steps = _util.rows_per_sample(args, axes["n"])
    return [Shape(n, v, d, steps) for d in axes["dtype"] for v in axes["vocab"] for n in axes["n"]]


def run(args, argv: list[str]) -> dict:
    """Measure every case of every shape; returns the JSON payload."""
    device = _util.pick_device(args.device)
    copy_bw, copy_bytes = _util.measured_copy_bandwidth(device)
    load_before = os.getloadavg()
    # On the CPU the cases build their inputs in their subprocesses (unless --in-process).
    here = device.type == "cuda" or args.in_process
    not_run: list[dict] = []
    rows = _util.run_grid(
        grid(args),
        args.cases,
        device,
        make_batch=lambda shape: make_batch(shape, device, args.seed) if here else None,
        head=lambda s, _: {
            "n": s.n,
            "vocab": s.vocab,
            "dtype": s.dtype,
            "batch": s.batch,
            "rows_per_sample": s.rows_per_sample,
        },
        measure_case=lambda case, shape, batch: (
            measure_cpu(case, shape, batch, args)
            if device.type == "cpu"
            else measure_case(case, batch, shape, device, args)
        ),
        finish=lambda case, shape, row: row_bandwidth(row, copy_bw),
        deadline=_util.Deadline(args.time_budget_s),
        not_run=not_run,
    )
    settings = {
        "warmup": args.warmup,
        "reps": args.reps,
        "seed": args.seed,
        "cases": list(args.cases),
        "nlft_config": asdict(NLFTConfig()),
        "time_budget_s": args.time_budget_s,
        "in_process": args.in_process,
    }
    question = "forward+backward time and peak memory of the NLFT loss against its baselines"
    return _util.payload_header("bench_loss", question, device, "benchmarks.bench_loss", argv, settings, METHOD) | {
        # Other processes on a shared machine inflate CPU timings; the load average shows how much.
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "backends": backends(),
        "copy_bandwidth_bytes_per_s": copy_bw,
        "copy_bandwidth_buffer_bytes": copy_bytes,
        "cases": rows,
        # Shapes the time budget left out entirely (their cases are not in "cases").
        "not_run": not_run,
    }


def markdown_table(payload: dict) -> str:
    """One line per case: median time, time relative to nlft_kernels, extra peak memory, bandwidth."""
    ours = {
        (r["n"], r["vocab"], r["dtype"]): r.get("median_ms") for r in payload["cases"] if r["case"] == "nlft_kernels"
    }
    copy_bw = payload.get("copy_bandwidth_bytes_per_s")
    copy_text = f"copy bandwidth {copy_bw / 1e9:.1f} GB/s" if copy_bw else "copy bandwidth not measured"
    lines = [
        f"Device: {payload['device']} ({payload['device_type']}); torch {payload['versions']['torch']}; {copy_text}",
        "",
        *_util.table_head(
            ["N", "V", "dtype", "case", "median ms", "x nlft_kernels", "extra peak MiB", "GB/s", "% of copy BW"],
            numeric={"N", "V", "median ms", "x nlft_kernels", "extra peak MiB", "GB/s", "% of copy BW"},
        ),
    ]
    for r in payload["cases"]:
        lead = f"| {r['n']} | {r['vocab']} | {r['dtype']} | {r['case']} |"
        if r["status"] != "ok":
            lines.append(_util.unmeasured_cells(lead, r, 60, 5))
            continue
        base = ours.get((r["n"], r["vocab"], r["dtype"]))
        ratio = f"{r['median_ms'] / base:.2f}" if base else "-"
        mem = r.get("peak_extra_bytes")
        mem = f"{mem / 2**20:.0f}" if mem is not None else "-"
        lines.append(
            f"{lead} {r['median_ms']:.2f} | {ratio} | {mem} | {_util.bandwidth_cells(row_bandwidth(r, copy_bw))} |"
        )
    lines += _util.not_run_lines(payload, lambda s: f"{s['n']}x{s['vocab']} {s['dtype']}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _util.benchmark_parser("benchmarks.bench_loss", __doc__, GRIDS)
    _util.add_grid_args(p, ("n", "vocab"), "logits", CASES)
    _util.add_run_args(p, "bench_loss-<device>-<date>.json", warmup=(5, 1), reps=(50, 5))
    p.add_argument(
        "--time-budget-s",
        type=float,
        help="start no case after this many seconds; what is left out is recorded (benchmarks.gpu_suite)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="CPU: measure in this process, not a fresh subprocess per case (smoke tests; less isolated)",
    )
    return _util.resolve_run_args(p.parse_args(argv))


def write(args, payload: dict) -> Path:
    out = _util.result_path(args.out, "bench_loss", torch.device(payload["device_type"]), sep="-")
    return _util.write_run(out, payload, markdown_table(payload), None if args.no_plot else partial(plot_results, out))


def main(argv: list[str] | None = None) -> Path | None:
    """Run the benchmark; returns the JSON path (None in a probe subprocess)."""
    return _util.script_main(argv, parse_args, probe_main, run, write)


if __name__ == "__main__":
    main()
