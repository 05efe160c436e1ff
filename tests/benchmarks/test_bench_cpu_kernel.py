"""benchmarks/bench_cpu_kernel.py's rows that were not measured (out of memory) render with their
status, next to a row written before rows had a status (tests/csrc/test_bench_cpu_kernel.py
runs the script end to end)."""

from __future__ import annotations

from benchmarks import bench_cpu_kernel


def test_unmeasured_rows_render_with_their_status():
    shape = {"n": 128, "vocab": 1000, "dtype": "float32"}
    payload = {
        "device": "cpu",
        "device_type": "cpu",
        "cpu_threads": 2,
        "versions": {"torch": "2.x"},
        "copy_bandwidth_bytes_per_s": None,
        "cases": [
            shape | {"case": "cpp", "median_ms": 2.0, "ratio_to_cross_entropy": 0.5},  # no status: measured
            shape | {"case": "cuda", "status": "oom", "note": "CUDA out of memory", "ratio_to_cross_entropy": None},
        ],
    }
    table = bench_cpu_kernel.markdown_table(payload)
    assert "| 128 | 1000 | float32 | cpp | 2.0 | 0.50 |" in table
    assert "| 128 | 1000 | float32 | cuda | oom: CUDA out of memory | | |" in table
