"""How much memory and time does the fused linear NLFT loss save over materialising the logits?

Each case does the loss-head work of one NLFT step on N rows of hidden size D, over an LM head
W [V, D]: the label log-probs of the two teacher views (standard, judge) under no_grad, then
the base view's loss, forward and backward, into the gradients of hidden and W.

  nlft_linear_loss   ``linear_token_logprobs`` for the teachers, ``nlft_linear_loss`` for the base
                     view: no [N, V] tensor exists (chunk size chosen automatically)
  materialised       ``hidden @ W.T`` for each view (teachers under no_grad), then ``nlft_loss``
                     with the teacher logits and ``hidden_states`` (the same clusters)
  liger_flce         Liger-Kernel's fused linear cross-entropy once per view (base with backward,
                     teachers with reduction "none"): what a fused CE costs, not the NLFT loss
  cut_cross_entropy  Apple's Cut Cross-Entropy ``linear_cross_entropy``, likewise once per view
  torch_lce          PyTorch's ``torch.nn.functional.linear_cross_entropy`` (2.13+), reference path
                     (``options=None``: the logits are materialised): one call, the base view's
                     loss forward + backward
  torch_lce_x3       the same once per view: the teachers with reduction "none" under no_grad, then
                     the base view: the fused cross-entropy's cost of an NLFT step
  torch_lce_chunked, torch_lce_chunked_x3
                     likewise with its chunked path (``options=LinearCrossEntropyOptions()``, whose
                     chunk size and precision policy are torch's own per-device defaults)

The floor of a shape: the matmul FLOPs (three forward logits matmuls and the two gradient
matmuls of the base view, 10 N V D) at this device's measured matmul rate (bf16 on GPUs, fp32
on CPUs) plus the bytes the loss head must move at the least (read three hidden views and W,
write the hidden and W gradients) at the measured copy bandwidth.

Run from the repository root:
  python -m benchmarks.bench_linear_loss --quick   # CPU-sized grid, under ~2 minutes on 2 cores
  python -m benchmarks.bench_linear_loss           # GPU grid: D=4096, V in {32000, 128256, 151936}
Writes benchmarks/results/linear_loss_<device>_<date>.json (``--out`` to change), a PNG next to
it and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from benchmarks import _util
from nlft_kernels import linear_token_logprobs, nlft_linear_loss, nlft_loss
from nlft_kernels.ops.launch import token_logprobs_traffic
from nlft_kernels.ops.linear_chunks import chunk_traffic, out_dtype_matmuls

TORCH_LCE_CASES = ("torch_lce", "torch_lce_x3", "torch_lce_chunked", "torch_lce_chunked_x3")
CASES = ("nlft_linear_loss", "materialised", "liger_flce", "cut_cross_entropy", *TORCH_LCE_CASES)
DTYPES = _util.DTYPES

QUICK_GRID = {"n": (1024,), "dim": (256,), "vocab": (4096, 16384, 32000), "dtype": ("float32",)}
FULL_GRID = {"n": (4096, 16384), "dim": (4096,), "vocab": (32000, 128256, 151936), "dtype": ("bfloat16",)}
TINY_GRID = {"n": (64,), "dim": (32,), "vocab": (500,), "dtype": ("float32",)}
GRIDS = {"tiny": TINY_GRID, "quick": QUICK_GRID, "full": FULL_GRID}

# Label lifts (added to the label's logit) that make the saliency tests fire: log V + 6 puts the
# standard view's p_s above 0.95, log V + 4 the judge view's p_j far above p_b and p_s.
STANDARD_LIFT, JUDGE_LIFT = 6.0, 4.0

METHOD = {
    "step": (
        "teachers: label log-probs of the standard and judge views under torch.no_grad; base view: "
        "loss forward + backward into hidden.grad and W.grad (sample_mean, clusters on hidden)"
    ),
    "timing": ("median over --reps calls after --warmup untimed ones, .grad dropped before each call; ") + _util.TIMING,
    "memory_cuda": (
        "torch.cuda.max_memory_allocated during one call after reset_peak_memory_stats, minus "
        "memory_allocated before it: bytes beyond the inputs, the gradients written included"
    ),
    "memory_cpu": (
        "each case in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536 (RSS follows live tensors); "
        "after one warm-up call the RSS high-water mark is reset through /proc/self/clear_refs and the "
        "peak RSS (VmHWM) of one call minus the RSS before it is reported: bytes beyond the inputs, the "
        "gradients written included"
    ),
    "floor": (
        "10 N V D FLOPs (3 forward logits matmuls + 2 gradient matmuls) / measured matmul rate + "
        "elem * (4 N D + 2 V D) bytes (read 3 hidden views and W, write the hidden and W gradients) / "
        "measured copy bandwidth"
    ),
    "logit_bytes": (
        "the bytes nlft_linear_loss moves through [c, V] logits chunks by its model (counted in "
        "tests/ops/test_linear_traffic.py): base view N * sum(linear_chunks.chunk_traffic) (logits GEMM "
        "write, row pass 2 reads + in-place gradient write, dX and dW GEMM reads, in the input dtype), "
        "teachers 2 N (4 V + 4 (V + 1)) (float32 logits tiles written by the GEMM, read once)"
    ),
    "inputs": (
        "flat rows with sample_ids, B = N / T samples of T rows; hidden ~ N(0, 1), teachers' hidden = base "
        "+ N(0, 0.25), W ~ N(0, 1/D); sample kinds cycle correct (standard label lifted by log V + 6 on "
        "~35% of rows) / wrong with the judge label lifted on 25% of rows (killed by the 6% rule) / wrong "
        "with one lifted row / wrong without; the last (b mod 3) rows of sample b are padding"
    ),
}


@dataclass(frozen=True)
class Shape(_util.RowShape):
    n: int
    dim: int
    vocab: int
    dtype: str
    rows_per_sample: int


@dataclass
class Batch:
    """One shape's inputs: hidden [3, N, D] (base, standard, judge; the base row is the leaf that
    trains), weight [V, D] (requires grad), labels [N], sample_ids [N], correct [B], and the label
    lifts [2, N] (float32) of the standard and judge views."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    sample_ids: torch.Tensor
    correct: torch.Tensor
    lifts: torch.Tensor


def make_batch(shape: Shape, device: torch.device, seed: int = 0) -> Batch:
    """Random inputs on ``device`` in which saliency, unlikelihood and the 6% rule all occur (the
    rows, samples and lifted labels: the harness's ``nlft_rows``)."""
    n, vocab = shape.n, shape.vocab
    dtype = DTYPES[shape.dtype]
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(3, n, shape.dim, generator=g, device=device)
    hidden[1:] = hidden[0] + 0.5 * torch.randn(2, n, shape.dim, generator=g, device=device)
    weight = torch.randn(vocab, shape.dim, generator=g, device=device) / math.sqrt(shape.dim)
    rows = _util.nlft_rows(n, shape.rows_per_sample, vocab, g, device)
    lifts = torch.zeros(2, n, device=device)
    lifts[0, rows.lift_standard] = math.log(vocab) + STANDARD_LIFT
    lifts[1, rows.lift_judge] = math.log(vocab) + JUDGE_LIFT
    return Batch(
        hidden=hidden.to(dtype),
        weight=weight.to(dtype).requires_grad_(),
        labels=rows.labels,
        sample_ids=rows.sample_ids,
        correct=rows.correct,
        lifts=lifts,
    )


def lift_logprob(logprob: torch.Tensor, lift: torch.Tensor) -> torch.Tensor:
    """log p(label) [N] after adding ``lift`` [N] to the label's logit, from log p(label) before:
    the new log-sum-exp is lse + log1p(p * (e^lift - 1))."""
    return logprob + lift - torch.log1p(torch.expm1(lift) * logprob.exp())


def lift_logits(logits: torch.Tensor, labels: torch.Tensor, lift: torch.Tensor) -> torch.Tensor:
    """Add ``lift`` [N] to each row's label logit of ``logits`` [N, V], in place (padding: column 0, unread)."""
    return logits.scatter_add_(1, labels.clamp(min=0)[:, None], lift[:, None].to(logits.dtype))


def _liger() -> tuple[Callable | None, str]:
    """(a factory of Liger's fused linear CE module, '') or (None, why not)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as error:
        return None, f"liger-kernel is not installed ({error})"
    return LigerFusedLinearCrossEntropyLoss, ""


def _cce() -> tuple[Callable | None, str]:
    """(Cut Cross-Entropy's ``linear_cross_entropy``, '') or (None, why not)."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as error:
        return None, f"cut-cross-entropy is not installed ({error})"
    return linear_cross_entropy, ""


def _torch_lce() -> tuple[Callable | None, type | None, str]:
    """(``F.linear_cross_entropy``, ``nn.LinearCrossEntropyOptions``, '') or (None, None, why not)."""
    function = getattr(torch.nn.functional, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if function is None or options is None:
        return None, None, f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (2.13+)"
    return function, options, ""


def unavailable(case: str, device: torch.device) -> str:
    """Why ``case`` cannot run on ``device`` ('' when it can)."""
    if case == "liger_flce":
        why = _liger()[1]
        return why or ("Liger-Kernel's Triton kernels need CUDA" if device.type != "cuda" else "")
    if case == "cut_cross_entropy":
        why = _cce()[1]
        return why or ("Cut Cross-Entropy's kernels need CUDA" if device.type != "cuda" else "")
    if case in TORCH_LCE_CASES:
        return _torch_lce()[2]
    return ""


def build_case(case: str, batch: Batch) -> tuple[Callable[[], None], Callable[[], None]]:
    """(step, reset): ``step`` runs one loss-head step of ``case``; ``reset`` drops the gradients."""
    base = batch.hidden[0].detach().requires_grad_()
    teachers = batch.hidden[1], batch.hidden[2]
    weight, labels = batch.weight, batch.labels
    samples = dict(sample_ids=batch.sample_ids)

    def reset() -> None:
        base.grad = None
        weight.grad = None

    if case == "nlft_linear_loss":

        def step() -> None:
            fused_loss(batch, base).backward()

    elif case == "materialised":

        def step() -> None:
            with torch.no_grad():
                standard, judge = (
                    lift_logits(h @ weight.T, labels, lift) for h, lift in zip(teachers, batch.lifts, strict=True)
                )
            logits = base @ weight.T
            nlft_loss(
                logits, labels, batch.correct, standard=standard, judge=judge, hidden_states=base, **samples
            ).backward()

    elif case == "liger_flce":
        factory, why = _liger()
        if factory is None:
            raise RuntimeError(why)
        per_token, mean = factory(reduction="none"), factory(reduction="mean")

        def step() -> None:
            with torch.no_grad():
                for h in teachers:
                    per_token(weight, h, labels)
            mean(weight, base, labels).backward()

    elif case == "cut_cross_entropy":
        linear_cross_entropy, why = _cce()
        if linear_cross_entropy is None:
            raise RuntimeError(why)

        def step() -> None:
            with torch.no_grad():
                for h in teachers:
                    linear_cross_entropy(h, weight, labels, reduction="none")
            linear_cross_entropy(base, weight, labels).backward()

    elif case in TORCH_LCE_CASES:
        linear_cross_entropy, options, why = _torch_lce()
        if linear_cross_entropy is None:
            raise RuntimeError(why)
        lce = partial(linear_cross_entropy, options=options() if "chunked" in case else None)
        teacher_views = teachers if case.endswith("_x3") else ()

        def step() -> None:
            with torch.no_grad():
                for h in teacher_views:
                    lce(h, weight, labels, reduction="none")
            lce(base, weight, labels).backward()

    else:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    return step, reset


def teacher_logprobs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The lifted label log-probs [N] of the standard and judge views, under no_grad, without logits."""
    with torch.no_grad():
        return tuple(
            lift_logprob(linear_token_logprobs(h, batch.weight, batch.labels), lift)
            for h, lift in zip(batch.hidden[1:], batch.lifts, strict=True)
        )


def fused_loss(batch: Batch, base: torch.Tensor, **kwargs):
    """The fused path's step: the teachers' log-probs, then ``nlft_linear_loss`` of ``base`` [N, D]."""
    standard, judge = teacher_logprobs(batch)
    loss_of = partial(nlft_linear_loss, standard=standard, judge=judge, sample_ids=batch.sample_ids)
    return loss_of(base, batch.weight, batch.labels, batch.correct, **kwargs)


def check_saliency(batch: Batch) -> dict[str, int]:
    """Counts of saliency, unlikelihood and killed rows of ``batch`` (the fused path's details)."""
    with torch.no_grad():
        _, details = fused_loss(batch, batch.hidden[0], return_details=True)
    return {name: int(getattr(details, name).sum()) for name in ("saliency", "unlikelihood", "killed", "cluster")}


def logit_bytes(shape: Shape, device: torch.device) -> int:
    """The bytes of nlft_linear_loss's step through logits chunks (METHOD["logit_bytes"])."""
    dtype = DTYPES[shape.dtype]
    base = chunk_traffic(shape.vocab, dtype, bias=False, out_dtype_matmul=out_dtype_matmuls(device, dtype))
    teachers = 2 * (4 * shape.vocab + token_logprobs_traffic(shape.vocab, torch.float32)["forward"]["logits"])
    return shape.n * (sum(base.values()) + teachers)


def floor(shape: Shape, matmul_flops_per_s: float, copy_bytes_per_s: float) -> dict[str, float]:
    """The floor of one step (see METHOD["floor"]): FLOPs, bytes and milliseconds."""
    n, d, v = shape.n, shape.dim, shape.vocab
    flops = 10 * n * v * d
    nbytes = shape.elem * (4 * n * d + 2 * v * d)
    ms = 1e3 * (flops / matmul_flops_per_s + nbytes / copy_bytes_per_s)
    return {"floor_flops": flops, "floor_bytes": nbytes, "floor_ms": ms}


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, reps: int = 5) -> float:
    """FLOP/s of a ``size``-cubed matmul in ``dtype`` (median of ``reps``)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    times = _util.time_ms(lambda: torch.mm(a, b, out=out), lambda: None, device, warmup=2, reps=reps)
    return 2 * size**3 / (_util.median(times) / 1e3)


def measure_case(case: str, batch: Batch, device: torch.device, args) -> dict:
    """Median time (and on CUDA, peak extra memory) of one case."""
    return _util.measure(*build_case(case, batch), device, args.warmup, args.reps)


def probe_main(spec: str) -> None:
    """The subprocess side of the CPU memory probe: prints {"peak_extra_bytes": ...} (METHOD["memory_cpu"])."""
    spec = json.loads(spec)
    batch = make_batch(Shape(**spec["shape"]), torch.device("cpu"), spec["seed"])
    print(json.dumps({"peak_extra_bytes": _util.cpu_peak_extra(*build_case(spec["case"], batch))}))


def grid(args) -> list[Shape]:
    """The shapes to measure: the chosen grid, with any axis overridden from the command line."""
    axes = _util.grid_axes(args, GRIDS, ("n", "dim", "vocab", "dtype"))
    steps = _util.rows_per_sample(args, axes["n"])
    return [
        Shape(n, d, v, dt, steps) for dt in axes["dtype"] for d in axes["dim"] for n in axes["n"] for v in axes["vocab"]
    ]


def run(args, argv: list[str]) -> dict:
    """Measure every case of every shape; returns the JSON payload."""
    device = _util.pick_device(args.device)
    cuda = device.type == "cuda"
    copy_bw, copy_bytes = _util.measured_copy_bandwidth(device)
    rate_dtype = torch.bfloat16 if cuda else torch.float32
    rate_size = 8192 if cuda else 1024
    rate = matmul_rate(device, rate_dtype, rate_size)
    load_before = os.getloadavg()

    def head(shape: Shape, batch: Batch | None) -> dict:
        fields = asdict(shape) | {"batch": shape.batch} | floor(shape, rate, copy_bw)
        fields["logit_bytes"] = logit_bytes(shape, device)
        return fields if batch is None else fields | {"exercised": check_saliency(batch)}

    def finish(case: str, shape: Shape, row: dict) -> dict:
        memory = {} if cuda else _util.probe("benchmarks.bench_linear_loss", spec(case, shape), True, f"{case} {shape}")
        return memory | {"x_floor": row["median_ms"] / row["floor_ms"]}

    def spec(case: str, shape: Shape) -> dict:
        return {"case": case, "shape": asdict(shape), "seed": args.seed}

    not_run: list[dict] = []
    rows = _util.run_grid(
        grid(args),
        args.cases,
        device,
        make_batch=lambda shape: make_batch(shape, device, args.seed),
        head=head,
        measure_case=lambda case, shape, batch: measure_case(case, batch, device, args),
        unavailable=lambda case: unavailable(case, device),
        finish=finish,
        deadline=_util.Deadline(args.time_budget_s),
        not_run=not_run,
    )
    settings = {"warmup": args.warmup, "reps": args.reps, "seed": args.seed, "cases": list(args.cases)}
    settings["time_budget_s"] = args.time_budget_s
    question = "memory and time of the fused linear NLFT loss against materialised logits and fused CE"
    module = "benchmarks.bench_linear_loss"
    return _util.payload_header("bench_linear_loss", question, device, module, argv, settings, METHOD) | {
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "copy_bandwidth_bytes_per_s": copy_bw,
        "copy_bandwidth_buffer_bytes": copy_bytes,
        "matmul_flops_per_s": rate,
        "matmul_rate_shape": {"size": rate_size, "dtype": str(rate_dtype).removeprefix("torch.")},
        "cases": rows,
        # Shapes the time budget left out entirely (their cases are not in "cases").
        "not_run": not_run,
    }


def markdown_table(payload: dict) -> str:
    """One line per case and shape: median time, x floor, peak extra memory, and time and memory
    as multiples of nlft_linear_loss's."""
    key = ("n", "dim", "vocab", "dtype")
    ours = {tuple(r[k] for k in key): r for r in payload["cases"] if r["case"] == "nlft_linear_loss"}
    rate, bandwidth = payload["matmul_flops_per_s"] / 1e9, payload["copy_bandwidth_bytes_per_s"] / 1e9
    lines = [
        f"Device: {payload['device']} ({payload['device_type']}, {payload['cpu_threads']} threads); "
        f"torch {payload['versions']['torch']}; matmul {rate:.0f} GFLOP/s "
        f"({payload['matmul_rate_shape']['dtype']}); copy bandwidth {bandwidth:.1f} GB/s",
        "",
        *_util.table_head(
            ["N", "D", "V", "dtype", "case", "median ms", "min ms", "floor ms", "x floor", "extra peak MiB"]
            + ["x ours time", "x ours mem"],
            numeric={"N", "D", "V", "median ms", "min ms", "floor ms", "x floor", "extra peak MiB"}
            | {"x ours time", "x ours mem"},
        ),
    ]
    for r in payload["cases"]:
        lead = f"| {r['n']} | {r['dim']} | {r['vocab']} | {r['dtype']} | {r['case']} |"
        if r["status"] != "ok":
            lines.append(_util.unmeasured_cells(lead, r, 70, 7))
            continue
        mem = r.get("peak_extra_bytes")
        mine = ours.get(tuple(r[k] for k in key), {})
        time_share = f"{r['median_ms'] / mine['median_ms']:.2f}" if mine.get("status") == "ok" else "-"
        ref = mine.get("peak_extra_bytes")
        mem_share = f"{mem / ref:.2f}" if mem is not None and ref else "-"
        mem = f"{mem / 2**20:.0f}" if mem is not None else "-"
        lines.append(
            f"{lead} {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['floor_ms']:.1f} | {r['x_floor']:.1f} | "
            f"{mem} | {time_share} | {mem_share} |"
        )
    lines += _util.not_run_lines(payload, lambda s: f"N={s['n']} D={s['dim']} V={s['vocab']} {s['dtype']}")
    return "\n".join(lines)


def plot(payload: dict, png_path: Path) -> Path | None:
    """Median time (with the floor) and extra peak memory against V, one line per case and N."""
    plt = _util.pyplot()
    if plt is None:
        return None
    rows = [r for r in payload["cases"] if r["status"] == "ok"]
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = dict.fromkeys((r["case"], r["n"], r["dim"], r["dtype"]) for r in rows)
    for case, n, dim, dtype in series:
        picked = sorted(
            (r for r in rows if (r["case"], r["n"], r["dim"], r["dtype"]) == (case, n, dim, dtype)),
            key=lambda r: r["vocab"],
        )
        vocabs = [r["vocab"] for r in picked]
        label = f"{case} N={n} D={dim} {dtype}"
        time_ax.plot(vocabs, [r["median_ms"] for r in picked], marker="o", label=label)
        if "peak_extra_bytes" in picked[0]:
            mem_ax.plot(vocabs, [r["peak_extra_bytes"] / 2**20 for r in picked], marker="o", label=label)
    floors = dict.fromkeys((r["n"], r["dim"], r["dtype"]) for r in rows)
    for n, dim, dtype in floors:
        by_vocab = {r["vocab"]: r["floor_ms"] for r in rows if (r["n"], r["dim"], r["dtype"]) == (n, dim, dtype)}
        vocabs = sorted(by_vocab)
        time_ax.plot(vocabs, [by_vocab[v] for v in vocabs], "k--", label=f"floor N={n} D={dim} {dtype}")
    for ax, title in ((time_ax, "median time of one step (ms)"), (mem_ax, "extra peak memory (MiB)")):
        ax.set_xlabel("vocabulary V")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    title = f"NLFT loss head, teachers + base fwd/bwd: {payload['device']} ({payload['date'][:10]})"
    return _util.save_figure(fig, png_path, title)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _util.benchmark_parser("benchmarks.bench_linear_loss", __doc__, GRIDS)
    _util.add_grid_args(p, ("n", "dim", "vocab"), "hidden/weight", CASES)
    _util.add_run_args(p, "linear_loss_<device>_<date>.json", warmup=(3, 1), reps=(20, 3))
    p.add_argument(
        "--time-budget-s",
        type=float,
        help="start no case after this many seconds; what is left out is recorded (benchmarks.gpu_suite)",
    )
    return _util.resolve_run_args(p.parse_args(argv))


def write(args, payload: dict) -> Path:
    out = _util.result_path(args.out, "linear_loss", torch.device(payload["device_type"]))
    return _util.write_run(out, payload, markdown_table(payload), None if args.no_plot else partial(plot, payload))


def main(argv: list[str] | None = None) -> Path | None:
    """Run the benchmark; returns the JSON path (None in the memory-probe subprocess)."""
    return _util.script_main(argv, parse_args, probe_main, run, write)


if __name__ == "__main__":
    main()
