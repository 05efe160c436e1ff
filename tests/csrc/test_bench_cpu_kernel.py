"""benchmarks/bench_cpu_kernel.py runs end to end on a tiny shape and writes what it promises."""

import json

from benchmarks import bench_cpu_kernel
from nlft_kernels.backends import extension


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
