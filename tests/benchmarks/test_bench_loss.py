"""benchmarks/bench_loss.py: its inputs exercise the whole rule, every case computes the same loss,
and a run writes the JSON, the Markdown table and the plot."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import _util, bench_loss
from benchmarks.bench_loss import COMPILED_CE, Shape, build_case, make_batch
from nlft_kernels.reference import nlft_loss_reference
from tests.tolerances import assert_loss_close

SHAPE = Shape(n=256, vocab=300, dtype="float32", rows_per_sample=32)


def reference(batch, views: torch.Tensor, **kwargs):
    """The reference loss of ``views`` [3, N, V] as [B, T, V] samples of SHAPE."""
    b, t = SHAPE.batch, SHAPE.rows_per_sample
    base, standard, judge = (v.view(b, t, -1) for v in views)
    return nlft_loss_reference(base, batch.labels.view(b, t), batch.correct, standard, judge, **kwargs)


def test_inputs_exercise_every_branch():
    batch = make_batch(SHAPE, torch.device("cpu"))
    _, details = reference(batch, batch.views.double(), return_details=True)
    correct = batch.correct
    assert correct.any() and not correct.all()
    assert details["saliency"][correct].any(), "no saliency token in a correct sample"
    assert details["saliency"][~correct].any(), "no saliency token in a wrong sample"
    assert details["unlikelihood"].any() and details["killed"].any()
    assert (batch.labels == -100).any()


@pytest.mark.parametrize("case", ["nlft_kernels", "authors_style", "reference", "cross_entropy", COMPILED_CE])
def test_cases_compute_the_loss(case, monkeypatch):
    """Every NLFT case computes the reference loss (its gradient lands on the base view)."""
    batch = make_batch(SHAPE, torch.device("cpu"))
    views = batch.views
    expected = reference(batch, views)
    seen = []
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: seen.append(self.detach()))
    step, reset = build_case(case, batch, SHAPE)
    reset()
    step()
    (loss,) = seen
    if case in ("cross_entropy", COMPILED_CE):
        ce = torch.nn.functional.cross_entropy(views[0].double(), batch.labels)
        assert_loss_close(loss, ce)
    else:
        assert_loss_close(loss, expected)


def test_quick_run_writes_json_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "loss.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_loss",
        "--tiny",
        "--reps",
        "2",
        "--out",
        str(out),
        "--cases",
        "nlft_kernels",
        "cross_entropy",
        "liger_cross_entropy_x3",
    ]
    root = bench_loss._util.REPO_ROOT
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    for key in ("device", "versions", "date", "command", "method", "copy_bandwidth_bytes_per_s", "backends"):
        assert key in payload, key
    rows = {r["case"]: r for r in payload["cases"]}
    for case in ("nlft_kernels", "cross_entropy"):
        assert rows[case]["status"] == "ok" and rows[case]["median_ms"] > 0 and rows[case]["peak_extra_bytes"] >= 0
    liger = rows["liger_cross_entropy_x3"]
    assert liger["status"] == "skipped" and liger["note"], liger  # Liger's kernels need CUDA
    table = out.with_suffix(".md").read_text()
    assert table == bench_loss.markdown_table(payload) + "\n" and table in done.stdout
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.skipif(not importlib.util.find_spec("pytest_benchmark"), reason="pytest-benchmark missing")
def test_pytest_benchmark_cases_run(tmp_path):
    """benchmarks/test_loss_cases.py on the tiny grid, each case once (--benchmark-disable)."""
    root = bench_loss._util.REPO_ROOT
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-disable",
        "benchmarks/test_loss_cases.py",
        "-k",
        "not compiled",  # the torch.compile cases: a compile each, tested in test_cases_compute_the_loss
    ]
    env = os.environ | {"NLFT_BENCH_GRID": "tiny", "PYTHONPATH": str(root)}
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4 passed" in done.stdout


def test_row_pass_bytes_count_each_view_once_the_base_twice_and_the_gradient():
    n, vocab = 1024, 32000
    # bf16 logits, standard and judge as logits, fp32 gradient: 2 + 2 row reads of 2 bytes, 4 to
    # write, and the label entry of each of the three views.
    expected = n * (vocab * (2 * (2 + 2) + 4) + 3 * 2) + n * _util.ROW_SCALAR_BYTES
    assert _util.nlft_row_pass_bytes(n, vocab, 2, 2, 4) == expected
    # No teacher view: one fused cross-entropy pass (read twice, write the gradient).
    assert _util.nlft_row_pass_bytes(n, vocab, 4, 0, 4) == n * (vocab * 12 + 4) + n * _util.ROW_SCALAR_BYTES
    assert bench_loss.bytes_moved("nlft_kernels", n, vocab, "bfloat16") == _util.nlft_row_pass_bytes(n, vocab, 2, 2, 2)
    assert bench_loss.bytes_moved("reference", n, vocab, "float32") == _util.nlft_row_pass_bytes(n, vocab, 4, 2, 4)
    assert bench_loss.bytes_moved("cross_entropy", n, vocab, "float32") == _util.nlft_row_pass_bytes(n, vocab, 4, 0, 4)
    with pytest.raises(ValueError, match="0, 1 or 2"):
        _util.nlft_row_pass_bytes(n, vocab, 2, 3, 2)


def test_table_renders_results_written_before_the_bandwidth_columns():
    """An old result (no bandwidth fields, no copy measurement) still renders, its GB/s computed."""
    shape = {"n": 1024, "vocab": 1000, "dtype": "float32"}
    payload = {
        "device": "Old CPU",
        "device_type": "cpu",
        "versions": {"torch": "2.0"},
        "cases": [
            shape | {"case": "nlft_kernels", "status": "ok", "median_ms": 10.0, "peak_extra_bytes": 2**20},
            shape | {"case": "cross_entropy", "status": "ok", "median_ms": 5.0},
        ],
    }
    table = bench_loss.markdown_table(payload)
    gbs = _util.nlft_row_pass_bytes(1024, 1000, 4, 2, 4) / 10e-3 / 1e9
    assert f"| 1024 | 1000 | float32 | nlft_kernels | 10.00 | 1.00 | 1 | {gbs:.1f} | - |" in table
    assert "copy bandwidth not measured" in table


def test_time_budget_records_what_it_left_out(tmp_path):
    out = tmp_path / "loss.json"
    argv = ["--tiny", "--in-process", "--cases", "nlft_kernels", "--time-budget-s", "0", "--out", str(out)]
    assert bench_loss.main(argv) == out
    payload = json.loads(out.read_text())
    assert payload["cases"] == [] and payload["not_run"] == [
        {"n": 64, "vocab": 1000, "dtype": "float32", "rows_per_sample": 16}
    ]
    assert "Not run (the time budget of 0 s ran out): 64x1000 float32." in out.with_suffix(".md").read_text()
    assert not out.with_suffix(".png").exists()
