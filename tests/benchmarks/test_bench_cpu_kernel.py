"""benchmarks/bench_cpu_kernel.py over the harness: one tiny CPU run writes every case with its
ratio to cross-entropy and bandwidth; a time budget of 0 records the shape it left out; rows
that were not measured, and results written before rows had a status, render."""

from __future__ import annotations

import json

from benchmarks import _util, bench_cpu_kernel

TINY = ["--shapes", "128x1000", "--dtype", "float32", "--warmup", "0", "--reps", "1"]


def test_tiny_cpu_run(tmp_path):
    out = tmp_path / "cpu_kernel.json"
    assert bench_cpu_kernel.main([*TINY, "--cases", "torch", "cross_entropy", "--out", str(out)]) == out
    payload = json.loads(out.read_text())
    rows = {r["case"]: r for r in payload["cases"]}
    assert set(rows) == {"torch", "cross_entropy"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["cross_entropy"]["ratio_to_cross_entropy"] == 1.0
    ratio = rows["torch"]["median_ms"] / rows["cross_entropy"]["median_ms"]
    assert rows["torch"]["ratio_to_cross_entropy"] == ratio
    assert rows["torch"]["bytes_moved"] == _util.nlft_row_pass_bytes(128, 1000, 4, 2, 4)
    assert payload["command"] == _util.command_line(
        "benchmarks.bench_cpu_kernel", [*TINY, "--cases", "torch", "cross_entropy", "--out", str(out)]
    )
    assert out.with_suffix(".md").read_text() == bench_cpu_kernel.markdown_table(payload) + "\n"


def test_time_budget_and_unmeasured_rows(tmp_path):
    out = tmp_path / "cpu_kernel.json"
    assert bench_cpu_kernel.main([*TINY, "--time-budget-s", "0", "--out", str(out)]) == out
    payload = json.loads(out.read_text())
    assert payload["cases"] == [] and payload["not_run"] == [{"n": 128, "vocab": 1000, "dtype": "float32"}]
    shape = {"n": 128, "vocab": 1000, "dtype": "float32"}
    payload["cases"] = [
        shape | {"case": "cpp", "median_ms": 2.0, "ratio_to_cross_entropy": 0.5},  # written before rows had a status
        shape | {"case": "cuda", "status": "oom", "note": "CUDA out of memory"},
    ]
    table = bench_cpu_kernel.markdown_table(payload)
    assert "| 128 | 1000 | float32 | cpp | 2.0 | 0.50 |" in table
    assert "| 128 | 1000 | float32 | cuda | oom: CUDA out of memory | | |" in table
