"""benchmarks/bench_cpu_kernel.py runs end to end on a tiny shape and writes what it promises."""

import json

import pytest

from benchmarks import _util, bench_cpu_kernel
from nlft_kernels.extension import extension


def test_cpu_mode_writes_timings_and_ratios(tmp_path):
    cases = ["cpp", "torch", "cross_entropy"] if extension()[0] is not None else ["torch", "cross_entropy"]
    out = tmp_path / "bench.json"
    bench_cpu_kernel.main(
        [
            "--shapes",
            "128x1000",
            "--dtype",
            "float32",
            "--warmup",
            "0",
            "--reps",
            "1",
            "--cases",
            *cases,
            "--out",
            str(out),
        ]
    )
    payload = json.loads(out.read_text())
    assert payload["command"].startswith("python -m benchmarks.bench_cpu_kernel --shapes 128x1000")
    assert {"device", "versions", "date", "backends", "copy_bandwidth_bytes_per_s"} <= set(payload)
    rows = {r["case"]: r for r in payload["cases"]}
    assert set(rows) == set(cases)
    assert rows["cross_entropy"]["ratio_to_cross_entropy"] == 1.0
    for row in rows.values():
        assert row["median_ms"] > 0 and row["achieved_bytes_per_s"] > 0
        assert row["bytes_moved"] == bench_cpu_kernel.bytes_moved(row["case"], 128, 1000, "float32")
        assert row["fraction_of_copy_bandwidth"] == pytest.approx(
            row["achieved_bytes_per_s"] / payload["copy_bandwidth_bytes_per_s"]
        )
    assert rows["torch"]["bytes_moved"] == _util.nlft_row_pass_bytes(128, 1000, 4, 2, 4)
    assert rows["cross_entropy"]["bytes_moved"] == _util.nlft_row_pass_bytes(128, 1000, 4, 0, 4)
    assert payload["not_run"] == []


def test_time_budget_and_results_without_bandwidth(tmp_path):
    out = tmp_path / "bench.json"
    bench_cpu_kernel.main(["--shapes", "128x1000", "--dtype", "float32", "--time-budget-s", "0", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["cases"] == [] and payload["not_run"] == [{"n": 128, "vocab": 1000, "dtype": "float32"}]
    # A result written before the bandwidth fields (and without a copy measurement) still renders.
    payload["copy_bandwidth_bytes_per_s"] = None
    payload["cases"] = [{"n": 128, "vocab": 1000, "dtype": "float32", "case": "cpp", "median_ms": 1.0}]
    gbs = _util.nlft_row_pass_bytes(128, 1000, 4, 2, 4) / 1e-3 / 1e9
    assert f"| 128 | 1000 | float32 | cpp | 1.0 | - | {gbs:.1f} | - |" in bench_cpu_kernel.markdown_table(payload)
