"""Peak memory of a step on the CPU, from torch's own allocator records (not RSS).

``torch.profiler`` with ``profile_memory=True`` records, per op, the bytes its allocations and
frees change (an op's figure includes its children's) and, as ``[memory]`` events, the frees
outside any op. The innermost events (ops without children, and those ``[memory]`` events) in
time order give the live bytes after each; their running maximum is the step's peak above what
was live before it. Allocations inside the compiled extension go through the same allocator
(``at::empty``), so they are seen; buffers a C++ kernel takes from ``malloc`` for its own
scratch (a few tiles) are not, nor are Triton's interpreter's NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def peak_extra_bytes(step: Callable[[], object]) -> int:
    """Bytes allocated through torch at the peak of ``step()``, above those live before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    leaves = [e for e in prof.events() if not e.cpu_children and e.cpu_memory_usage]
    live = peak = 0
    for event in sorted(leaves, key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak
