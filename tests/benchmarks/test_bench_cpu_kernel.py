"""benchmarks/bench_cpu_kernel.py's rows that were not measured (out of memory) render with their
status, next to a row written before rows had a status (tests/csrc/test_bench_cpu_kernel.py
runs the script end to end); --gpu's GPU_CHOICE proposal follows the measurement."""

from __future__ import annotations

import importlib

from benchmarks import bench_cpu_kernel

backends_module = importlib.import_module("nlft_kernels.backends")


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


def _cpu_kernel_payload(ms: dict[tuple[int, int], tuple[float, float]]) -> dict:
    """bench_cpu_kernel --gpu rows: (N, V) -> (cuda ms, triton ms), the same in both dtypes."""
    rows = []
    for (n, vocab), (cuda, triton) in ms.items():
        for dtype in ("bfloat16", "float32"):
            shape = {"n": n, "vocab": vocab, "dtype": dtype}
            rows += [shape | {"case": "cuda", "median_ms": cuda}, shape | {"case": "triton", "median_ms": triton}]
            rows.append(shape | {"case": "cross_entropy", "median_ms": 1.0})
    return {"device_type": "cuda", "cases": rows}


def test_gpu_choice_sends_each_measured_shape_to_its_faster_kernel(monkeypatch):
    # CUDA wins at few rows; at 32000 also at 8192 rows; Triton wins the big shapes, and a 1%
    # CUDA lead (under the noise margin) stays with Triton.
    measured = {
        (1024, 32000): (1.0, 1.5),
        (8192, 32000): (5.0, 6.0),
        (1024, 128256): (2.0, 2.5),
        (8192, 128256): (9.9, 10.0),
    }
    choice = bench_cpu_kernel.propose_gpu_choice(_cpu_kernel_payload(measured))
    assert choice["proposal"] == [
        [bench_cpu_kernel.UNBOUNDED, 32000, "cuda"],
        [1024, bench_cpu_kernel.UNBOUNDED, "cuda"],
    ]
    monkeypatch.setattr(backends_module, "GPU_CHOICE", tuple(tuple(e) for e in choice["proposal"]))
    monkeypatch.setattr(backends_module, "_cuda_unavailable", lambda: None)
    for (n, vocab), (cuda, triton) in measured.items():
        want = "cuda" if cuda / triton < 1 - bench_cpu_kernel.CUDA_MARGIN else "triton"
        assert backends_module.gpu_choice(n, vocab) == want, (n, vocab)
    # Beyond the grid: the nearest measured point decides.
    assert backends_module.gpu_choice(100_000, 32000) == "cuda"
    assert backends_module.gpu_choice(100_000, 256000) == "triton"
    table_of = {"device": "GPU", "device_type": "cuda", "cpu_threads": 1, "versions": {"torch": "2.x"}, "cases": []}
    assert choice["literal"] in bench_cpu_kernel.markdown_table(table_of | {"gpu_choice": choice})
    literal = choice["literal"]
    namespace: dict = {}
    exec(literal, namespace)  # the printed literal is valid Python with the same entries
    assert [list(e) for e in namespace["GPU_CHOICE"]] == choice["proposal"]


def test_gpu_choice_is_empty_when_triton_always_wins():
    choice = bench_cpu_kernel.propose_gpu_choice(
        _cpu_kernel_payload({(1024, 32000): (2.0, 1.0), (8192, 32000): (3.0, 3.0)})
    )
    assert choice["proposal"] == [] and choice["literal"].endswith("= ()")
    none = bench_cpu_kernel.propose_gpu_choice({"cases": [{"n": 1, "vocab": 2, "dtype": "float32", "case": "triton"}]})
    assert none["proposal"] is None and none["reason"]
