"""The benchmarks' one harness: device identity, versions, timing, memory, grids, probes in fresh
processes, OOM handling, the NLFT rows every loss benchmark builds, result files.

Every script records the same facts about where and how it measured, so results written by
different scripts can be read side by side.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nlft_kernels.recipes.machine import device_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]


def device_slug(device: torch.device) -> str:
    """A file-name-safe short name such as ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc``."""
    name = device_name(device).lower()
    if device.type == "cpu":
        name = f"cpu-{name}"
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:48]


def versions() -> dict[str, str | None]:
    """Versions of everything a timing depends on; ``None`` for what is not installed."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import nlft_kernels

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "nlft_kernels": nlft_kernels.__version__,
        "platform": platform.platform(),
    }


def environment(device: torch.device) -> dict[str, object]:
    """Device name, slug, versions and thread count, the header of every result file."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "cpu_threads": torch.get_num_threads(),
        "versions": versions(),
    }


def command_line(module: str, argv: list[str]) -> str:
    """The command that reproduces a run, as typed from the repository root."""
    return shlex.join(["python", "-m", module, *argv])


def today() -> str:
    return dt.date.today().isoformat()


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# How every benchmark times a call (the METHOD texts of the bench_* scripts quote it).
TIMING = (
    "CUDA: triton.testing.do_bench (CUDA events around each call, the L2 cache flushed before each; "
    "--warmup/--reps counts converted to its milliseconds through a first short do_bench, so the number "
    "of timed calls is about --reps and recorded as reps), the reset (dropping .grad, host only) inside "
    "the call; CPU: one call per measurement through timeit, which torch.utils.benchmark.Timer wraps, "
    "with torch.utils.benchmark's clock, the reset outside it"
)
# Calls of ``step`` that do_bench makes besides the requested warm-up and timed ones, in time_ms's two
# do_bench calls (each: one first call, five to estimate; the first also one warm-up and one timed).
DO_BENCH_EXTRA_CALLS = 2 * (1 + 5) + 2


def time_ms(
    step: Callable[[], object], reset: Callable[[], None], device: torch.device, warmup: int, reps: int
) -> list[float]:
    """Milliseconds of each timed call of ``step``, after ``warmup`` untimed ones; ``reset`` runs
    before every call (e.g. dropping ``.grad``). See TIMING: ``triton.testing.do_bench`` on CUDA
    (about ``reps`` timed calls), timeit with torch.utils.benchmark's clock on the CPU (exactly
    ``reps``)."""
    if device.type == "cuda":
        return _do_bench_ms(step, reset, warmup, reps)
    for _ in range(warmup):
        reset()
        step()
    times = []
    for _ in range(reps):
        reset()
        times.append(_timeit_one(step) * 1e3)
    return times


def _timeit_one(call: Callable[[], object]) -> float:
    """Seconds of one call of ``call``: ``timeit`` with ``torch.utils.benchmark``'s clock (which
    synchronises the GPU where there is one). ``torch.utils.benchmark.Timer.timeit(n)`` wraps the
    same machinery but first makes max(n // 100, 2) untimed calls, which would triple the calls of a
    one-call measurement."""
    from torch.utils.benchmark.utils.timer import timer as clock

    return timeit.Timer(call, timer=clock).timeit(number=1)


def _do_bench_ms(step: Callable[[], object], reset: Callable[[], None], warmup: int, reps: int) -> list[float]:
    """``triton.testing.do_bench``'s per-call times: it takes milliseconds of warm-up and of timed
    calls, so a first do_bench with none of either (one call after its own estimate) gives the
    time of one call, through which the counts become milliseconds."""
    from triton.testing import do_bench

    def call() -> None:
        reset()
        step()

    one = do_bench(call, warmup=0, rep=0, return_mode="median")
    return list(do_bench(call, warmup=warmup * one, rep=reps * one, return_mode="all"))


def timed(step: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """(what ``step()`` returned, its milliseconds) of one call, timed as ``_timeit_one`` does: the
    clock synchronises the GPU before each reading, so the call's queued work is included."""
    out: list[object] = []
    seconds = _timeit_one(lambda: out.append(step()))
    return out[0], seconds * 1e3


def median(values: list[float]) -> float:
    return statistics.median(values)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """Bytes/s of ``dst.copy_(src)`` on ``nbytes`` buffers, counting the read and the write."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = time_ms(lambda: dst.copy_(src), lambda: None, device, warmup=2, reps=reps)
    return 2 * src.numel() * 4 / (median(times) / 1e3)


def copy_buffer_bytes(device: torch.device) -> int:
    """The buffer size of the copy-bandwidth measurement: 1 GiB on GPUs (far beyond any L2),
    256 MiB on CPUs (beyond the last-level cache, and small enough for a shared machine)."""
    return (1 << 30) if device.type == "cuda" else (256 << 20)


def measured_copy_bandwidth(device: torch.device) -> tuple[float, int]:
    """(bytes/s of a large ``dst.copy_(src)`` on ``device``, its buffer size): the ceiling every
    benchmark's achieved bandwidth is reported against, as quack reports its kernels."""
    nbytes = copy_buffer_bytes(device)
    return copy_bandwidth(device, nbytes), nbytes


# Per-row scalars of the fused row pass (nlft_kernels/ops/nlft_loss.py, _nlft_fwd_kernel): it
# reads the label (int64), the sample's wrong flag (int8) and the row scale (float32), and writes
# three float32 log-probs and the saliency flag (int8).
ROW_SCALAR_BYTES = 8 + 1 + 4 + 3 * 4 + 1


def nlft_row_pass_bytes(
    n_rows: int, vocab: int, elem_size: int, n_teacher_logit_views: int, grad_elem_size: int
) -> int:
    """Bytes the fused NLFT row pass moves through memory for ``n_rows`` rows of ``vocab`` logits.

    The package's traffic model (``nlft_kernels.ops.launch.row_pass_traffic``, which
    tests/ops/test_traffic.py checks against counted loads and stores): every given logits row
    is read once, the base row twice (the second sweep computes the gradient), the gradient row
    written once, and the label entry of each logits view; plus the per-row scalars
    (``ROW_SCALAR_BYTES``). With ``k = n_teacher_logit_views`` teacher views given as logits
    (0, 1 or 2; one given as [N] log-probs adds a scalar per row, not counted), about

        N V e (2 + k) + N V e_grad + N ROW_SCALAR_BYTES

    ``elem_size``: bytes per logit (2 for bf16/fp16, 4 for fp32); ``grad_elem_size``: bytes per
    gradient element. With ``k = 0`` this is also what one fused cross-entropy pass moves (read
    the row twice, write its gradient), the bound benchmarks use for a cross-entropy row. Every
    row counted as a labelled row of a wrong sample: an upper bound (ignored rows read nothing,
    correct samples skip the judge row). The achieved bandwidth of a case is these bytes over
    its time.
    """
    from nlft_kernels.ops.launch import row_pass_traffic

    if not 0 <= n_teacher_logit_views <= 2:
        raise ValueError(f"n_teacher_logit_views must be 0, 1 or 2, got {n_teacher_logit_views}")
    of_size = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}
    one_row = row_pass_traffic(
        vocab,
        of_size[elem_size],
        standard_logits=n_teacher_logit_views >= 1,
        judge_logits=n_teacher_logit_views >= 2,
        wrong=True,
        grad_type=of_size[grad_elem_size],
    )
    return n_rows * (sum(one_row.values()) + ROW_SCALAR_BYTES)


def bandwidth(bytes_moved: int, median_ms: float, copy_bytes_per_s: float | None) -> dict[str, float | None]:
    """The bandwidth fields of a result row: bytes moved, achieved bytes/s and its fraction of the
    measured copy bandwidth (None when the payload has no copy measurement)."""
    achieved = bytes_moved / (median_ms / 1e3)
    return {
        "bytes_moved": bytes_moved,
        "achieved_bytes_per_s": achieved,
        "fraction_of_copy_bandwidth": achieved / copy_bytes_per_s if copy_bytes_per_s else None,
    }


def bandwidth_cells(fields: dict[str, float | None]) -> str:
    """``GB/s | % of copy BW`` cells of a Markdown table row ("-" for what is missing)."""
    achieved, fraction = fields.get("achieved_bytes_per_s"), fields.get("fraction_of_copy_bandwidth")
    gbs = f"{achieved / 1e9:.1f}" if achieved is not None else "-"
    pct = f"{100 * fraction:.0f}" if fraction is not None else "-"
    return f"{gbs} | {pct}"


class Deadline:
    """A time budget for a whole run (``seconds`` None: none): scripts stop starting new work
    when it has passed and record what they left out, so that a run cut short by a caller's
    budget (benchmarks/gpu_suite.py) still writes its results."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._end = None if seconds is None else time.monotonic() + seconds

    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end

    def note(self) -> str:
        return f"not run: the time budget of {self.seconds:.0f} s (--time-budget-s) ran out"


def cuda_peak_extra(step: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated by one call of ``step`` at its peak, above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_peak_extra(step: Callable[[], object]) -> int:
    """Peak resident bytes of this process during one call of ``step``, above its RSS before it.

    Linux only: writing 5 to /proc/self/clear_refs resets the high-water mark VmHWM, so the
    peak of this call is not hidden by an earlier, larger one (``getrusage``'s maxrss cannot
    be reset). Run it in a process whose allocator returns freed buffers to the system (see
    ``RSS_ALLOCATOR_ENV``) or RSS also counts memory that is free but kept.
    """
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_bytes("VmRSS")
    step()
    return _proc_status_bytes("VmHWM") - before


# glibc serves allocations of 64 KiB and up with mmap and unmaps them on free, so RSS follows
# the live tensors instead of keeping freed heap pages (its default threshold adapts up to 32 MiB).
RSS_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def pyplot():
    """``matplotlib.pyplot`` drawing to files only (the Agg backend: benchmark machines have no
    display), or None when matplotlib is not installed (a run then writes no PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: Path, title: str | None = None, dpi: int = 120) -> Path:
    """Title ``fig`` (``title`` over all its axes), lay it out, write it to ``path`` and close it."""
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)


def write_outputs(out: Path, payload: dict, table: str, plot: Callable[[Path], Path | None] | None) -> Path:
    """Write a run's JSON to ``out``, its Markdown ``table`` next to it (.md) and, with ``plot``
    (called with the PNG path; None when matplotlib is missing), its PNG; print the table."""
    write_json(out, payload)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    if plot is not None:
        png = plot(out.with_suffix(".png"))
        print(f"wrote {png}" if png else "matplotlib is not installed: no plot (pip install matplotlib)")
    return out


# ---- The harness: what every benchmark script does the same way -------------------------------
#
# A script is a table of cases plus a setup: its grids, a ``make_batch`` for one shape, a
# ``build_case`` returning (step, reset), a METHOD text and a table. Everything else (command line,
# grid choice, timing, memory, OOM, probes in fresh subprocesses, the payload's header, the result
# file's name) lives here, as in Liger-Kernel's benchmark/scripts over its utils.py.


def benchmark_parser(module: str, doc: str | None, grids: dict[str, object] | None = None) -> argparse.ArgumentParser:
    """The parser every script starts from: ``--quick`` and ``--tiny`` (mutually exclusive; the
    default is the full grid), their help showing ``grids``' entries when given."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or "").split("\n")[0])
    size = p.add_mutually_exclusive_group()
    quick, tiny = (f" {grids[k]}" if grids else "" for k in ("quick", "tiny"))
    size.add_argument("--quick", action="store_true", help=f"CPU-sized grid{quick}")
    size.add_argument("--tiny", action="store_true", help=f"smoke-test grid{tiny}")
    return p


def add_run_args(
    p: argparse.ArgumentParser,
    default_out: str,
    warmup: tuple[int, int] | None = None,
    reps: tuple[int, int] | None = None,
    probe: bool = True,
) -> None:
    """The flags of a measured run: --warmup/--reps when their defaults (CUDA, CPU) are given
    (resolved by ``resolve_run_args``), --seed, --device, --out, --no-plot, and the hidden --probe
    of the subprocess side of ``probe``."""
    if warmup is not None and reps is not None:
        on = "(default: {} on CUDA, {} on CPU)"
        p.add_argument("--warmup", type=int, help=f"untimed calls per case {on.format(*warmup)}")
        p.add_argument("--reps", type=int, help=f"timed calls per case {on.format(*reps)}")
        p.set_defaults(_run_defaults=(warmup, reps))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--out", type=Path, help=f"JSON path (default benchmarks/results/{default_out})")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG next to the JSON")
    if probe:
        p.add_argument("--probe", help=argparse.SUPPRESS)


AXIS_HELP = {"n": "rows N", "dim": "hidden sizes D", "vocab": "vocabulary sizes V"}


def add_grid_args(p: argparse.ArgumentParser, axes: tuple[str, ...], dtype_of: str, cases: tuple[str, ...]) -> None:
    """Flags overriding the grid's axes (``axes`` from AXIS_HELP, then --dtype of DTYPES), T
    (--rows-per-sample) and the cases to run (default: all of ``cases``)."""
    for axis in axes:
        p.add_argument(f"--{axis}", type=int, nargs="+", help=f"{AXIS_HELP[axis]} (overrides the grid's)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help=f"{dtype_of} dtypes (overrides the grid's)")
    p.add_argument("--rows-per-sample", type=int, help="T, rows per sample (default 128; 16 with --tiny)")
    p.add_argument("--cases", nargs="+", choices=cases, default=list(cases))


def resolve_run_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill --warmup and --reps from the defaults ``add_run_args`` was given, for the device the
    run will use."""
    (cuda_warmup, cpu_warmup), (cuda_reps, cpu_reps) = args._run_defaults
    cuda = pick_device(args.device).type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else cuda_warmup if cuda else cpu_warmup
    args.reps = args.reps if args.reps is not None else cuda_reps if cuda else cpu_reps
    del args._run_defaults
    return args


def pick_device(name: str | None) -> torch.device:
    """``name``, or CUDA when available, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def grid_axes(args: argparse.Namespace, grids: dict[str, dict], axes: tuple[str, ...]) -> dict[str, tuple]:
    """The values of each axis of the grid ``--tiny``/``--quick``/neither picks, an axis given on
    the command line (``args.<axis>``) replacing the grid's."""
    grid = grids["tiny" if args.tiny else "quick" if args.quick else "full"]
    return {axis: tuple(getattr(args, axis, None) or grid[axis]) for axis in axes}


def rows_per_sample(args: argparse.Namespace, ns: tuple[int, ...]) -> int:
    """T, rows per sample (``--rows-per-sample``; 16 with --tiny, else 128), checked to divide every N."""
    steps = args.rows_per_sample or (16 if args.tiny else 128)
    for n in ns:
        if n % steps:
            raise SystemExit(f"--n {n} is not a multiple of --rows-per-sample {steps}")
    return steps


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is running out of memory (torch's error, or a message saying so)."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free(device: torch.device) -> None:
    """Collect garbage, and give cached CUDA blocks back, between cases."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(
    step: Callable[[], object],
    reset: Callable[[], None],
    device: torch.device,
    warmup: int,
    reps: int,
    peak_memory: bool = True,
) -> dict:
    """The timing fields of one case (median, min, max of ``time_ms``, and how many calls it timed) and, on CUDA with
    ``peak_memory``, its peak extra memory (``cuda_peak_extra``); leaves the gradients dropped."""
    times = time_ms(step, reset, device, warmup, reps)
    row = {"status": "ok", "note": "", "median_ms": median(times), "min_ms": min(times), "max_ms": max(times)}
    row["reps"] = len(times)
    if device.type == "cuda" and peak_memory:
        reset()
        row["peak_extra_bytes"] = cuda_peak_extra(step, device)
    reset()
    return row


def cpu_peak_extra(step: Callable[[], object], reset: Callable[[], None]) -> int:
    """Peak extra RSS of one call of ``step`` after one warm-up call (lazy initialisation and any
    compilation happen outside the measured call); see ``rss_peak_extra``."""
    reset()
    step()
    reset()
    gc.collect()
    return rss_peak_extra(step)


def probe(module: str, spec: dict, memory: bool, what: str = "") -> dict:
    """Run ``python -m module --probe <spec as JSON>`` in a fresh process and return the JSON its
    last line prints. ``memory``: with ``RSS_ALLOCATOR_ENV``, so that its RSS follows the live
    tensors. A fresh process per measurement also keeps one case's leftovers (a compiled case's
    spinning OpenMP threads, cached buffers) away from the next."""
    env = os.environ | (RSS_ALLOCATOR_ENV if memory else {})
    done = subprocess.run(
        [sys.executable, "-m", module, "--probe", json.dumps(spec)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"probe {what or spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_grid(
    shapes: list,
    cases: list[str],
    device: torch.device,
    *,
    make_batch: Callable[[object], object],
    head: Callable[[object, object], dict],
    measure_case: Callable[[str, object, object], dict],
    unavailable: Callable[[str], str] = lambda case: "",
    finish: Callable[[str, object, dict], dict] | None = None,
    deadline: Deadline | None = None,
    not_run: list | None = None,
    not_run_of: Callable[[object], dict] = asdict,
) -> list[dict]:
    """One row per case and shape, in the grid's order.

    ``make_batch(shape)`` builds a shape's inputs (a shape whose inputs do not fit gives every
    case an ``oom`` row); ``head(shape, batch)`` the shape's fields of each row (``batch`` None
    when it did not fit); ``measure_case(case, shape, batch)`` a case's fields (running out of
    memory gives an ``oom`` row; any other error is raised); ``unavailable(case)`` why a case
    cannot run here (a ``skipped`` row); ``finish(case, shape, row)`` fields added to a measured
    row. With a ``deadline``, the shapes it leaves out entirely go to ``not_run`` (as
    ``not_run_of(shape)``) and the cases of a started shape to ``skipped`` rows.
    """
    rows = []
    for shape in shapes:
        if deadline is not None and deadline.expired():
            not_run.append(not_run_of(shape))
            continue
        try:
            batch = make_batch(shape)
        except torch.OutOfMemoryError:
            rows += [head(shape, None) | {"case": c, "status": "oom", "note": "inputs do not fit"} for c in cases]
            free(device)
            continue
        lead = head(shape, batch)
        for case in cases:
            if why := unavailable(case):
                rows.append(lead | {"case": case, "status": "skipped", "note": why})
                continue
            if deadline is not None and deadline.expired():
                rows.append(lead | {"case": case, "status": "skipped", "note": deadline.note()})
                continue
            print(f"{shape} {case} ...", file=sys.stderr, flush=True)
            try:
                row = lead | {"case": case} | measure_case(case, shape, batch)
            except Exception as error:  # noqa: BLE001 - running out of memory is a result; the rest is raised
                if not is_oom(error):
                    raise
                row = lead | {"case": case, "status": "oom", "note": str(error).splitlines()[0][:200]}
            free(device)
            if row["status"] == "ok" and finish is not None:
                row |= finish(case, shape, row)
            rows.append(row)
        del batch
        free(device)
    return rows


def payload_header(
    benchmark: str, question: str, device: torch.device, module: str, argv: list[str], settings: dict, method: dict
) -> dict:
    """The fields every result file starts with: what was asked, where, when, with which command
    and settings, and how it was measured (``method``'s ``memory`` entry chosen from its
    ``memory_cuda``/``memory_cpu`` by the device)."""
    memory = method.get("memory_cuda" if device.type == "cuda" else "memory_cpu")
    return {
        "benchmark": benchmark,
        "question": question,
        **environment(device),
        "date": now_iso(),
        "command": command_line(module, argv),
        "settings": settings,
        "method": method | ({"memory": memory} if memory is not None else {}),
    }


def result_path(out: Path | None, stem: str, device: torch.device, sep: str = "_") -> Path:
    """``out``, or benchmarks/results/<stem><sep><device slug><sep><date>.json."""
    return out or RESULTS_DIR / f"{stem}{sep}{device_slug(device)}{sep}{today()}.json"


def write_run(
    out: Path, payload: dict, table: str, plot: Callable[[Path], Path | None] | None, rows: str = "cases"
) -> Path:
    """``write_outputs``, without the plot when no row was measured (a time budget of 0 measures
    nothing) or ``plot`` is None (--no-plot)."""
    measured = any(r["status"] == "ok" for r in payload[rows])
    return write_outputs(out, payload, table, plot if measured else None)


def script_main(
    argv: list[str] | None,
    parse_args: Callable[[list[str]], argparse.Namespace],
    probe_main: Callable[[str], None] | None,
    run: Callable[[argparse.Namespace, list[str]], dict],
    write: Callable[[argparse.Namespace, dict], Path],
) -> Path | None:
    """A script's ``main``: parse ``argv`` (the command line's by default); with --probe, be the
    subprocess side of ``probe`` and return None; else run and write, returning the JSON path."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if getattr(args, "probe", None):
        probe_main(args.probe)
        return None
    return write(args, run(args, argv))


def table_head(columns: list[str], numeric: set[str]) -> list[str]:
    """The header and alignment lines of a Markdown table (``numeric`` columns right-aligned)."""
    align = "".join("---:|" if c in numeric else "---|" for c in columns)
    return ["| " + " | ".join(columns) + " |", "|" + align]


def unmeasured_cells(lead: str, row: dict, width: int, empty: int) -> str:
    """The table line of a row that was not measured: its status and note (cut at ``width``) in
    the first cell after ``lead``, then ``empty`` empty cells."""
    return f"{lead} {row['status']}: {row.get('note', '')[:width]}" + " |" * empty


def not_run_lines(payload: dict, shape_words: Callable[[dict], str]) -> list[str]:
    """The lines after a table that name the shapes the time budget left out (``payload["not_run"]``,
    each in ``shape_words``); none when every shape ran."""
    if not payload.get("not_run"):
        return []
    shapes = ", ".join(shape_words(s) for s in payload["not_run"])
    return ["", f"Not run (the time budget of {payload['settings']['time_budget_s']:.0f} s ran out): {shapes}."]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class RowShape:
    """What a grid point of ``n`` flat rows, in samples of ``rows_per_sample`` rows, of ``dtype``
    (a name in DTYPES) derives: a mixin of the scripts' frozen ``Shape`` dataclasses, which name
    their own axes (and so their result rows' keys, in order)."""

    @property
    def batch(self) -> int:
        return self.n // self.rows_per_sample

    @property
    def elem(self) -> int:
        """Bytes per element of ``dtype``."""
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()


# ---- The NLFT rows every loss benchmark builds (and the tests' inputs share) -------------------

# Kinds of sample, cycled over the batch: a correct response with saliency tokens; a wrong one
# with many saliency tokens (killed by the 6% rule); a wrong one with exactly one saliency
# token (1/T < 6% for T >= 17, not killed); a wrong one without saliency tokens.
KINDS = ("correct", "wrong_many", "wrong_one", "wrong_none")
# Shares of rows lifted: the standard view's label on correct samples (p_s > 0.95), the judge
# view's on wrong_many samples (more than 6% of the response: the sample is killed).
CORRECT_LIFTED, WRONG_MANY_LIFTED = 0.35, 0.25


def padding_rows(sample: int, steps: int) -> int:
    """Rows of padding at the end of sample ``sample`` of ``steps`` rows: ``sample mod 3``, at most
    ``steps - 1`` (every sample keeps a response row)."""
    return min(sample % 3, steps - 1)


@dataclass
class NLFTRows:
    """The layout of N = B * T flat rows: labels [N] (padding at ``ignore_index``), sample_ids [N],
    correct [B] (kind ``correct``), and which rows the standard view's label and the judge view's
    label are lifted on ([N] bool each) so that saliency, unlikelihood and the 6% rule all occur."""

    labels: torch.Tensor
    sample_ids: torch.Tensor
    correct: torch.Tensor
    lift_standard: torch.Tensor
    lift_judge: torch.Tensor


def nlft_rows(n: int, steps: int, vocab: int, g: torch.Generator, device: torch.device) -> NLFTRows:
    """The benchmarks' rows: random labels, sample kinds cycling ``KINDS``, ``padding_rows`` of
    padding per sample; draws the labels then one uniform per row from ``g``."""
    labels = torch.randint(0, vocab, (n,), generator=g, device=device)
    rows = torch.arange(n, device=device)
    sample_ids, t = rows // steps, rows % steps
    kind = sample_ids % len(KINDS)
    u = torch.rand(n, generator=g, device=device)
    lift_standard = (kind == KINDS.index("correct")) & (u < CORRECT_LIFTED)
    lift_judge = ((kind == KINDS.index("wrong_many")) & (u < WRONG_MANY_LIFTED)) | (
        (kind == KINDS.index("wrong_one")) & (t == 0)
    )
    padding = t >= steps - torch.clamp(sample_ids % 3, max=steps - 1)
    labels[padding] = -100  # NLFTConfig().ignore_index
    lift_standard &= ~padding
    lift_judge &= ~padding
    batch = n // steps
    correct = torch.arange(batch, device=device) % len(KINDS) == KINDS.index("correct")
    return NLFTRows(labels, sample_ids, correct, lift_standard, lift_judge)
