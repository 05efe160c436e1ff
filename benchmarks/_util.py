"""Helpers shared by the benchmark scripts: device identity, versions, timing, memory, JSON.

Every script records the same facts about where and how it measured, so results written by
different scripts can be read side by side.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
import shlex
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def time_ms(
    step: Callable[[], object], reset: Callable[[], None], device: torch.device, warmup: int, reps: int
) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``step`` after ``warmup`` untimed ones.

    ``reset`` runs before every call, outside the timed region (e.g. dropping ``.grad``).
    CUDA: events around each call; CPU: ``time.perf_counter`` (the CPU ops are synchronous).
    """
    for _ in range(warmup):
        reset()
        step()
    synchronize(device)
    times = []
    for _ in range(reps):
        reset()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


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
