"""The pure parts of benchmarks/bench_linear_loss.py: label lifts, inputs that exercise the rule, the floor,
torch's linear_cross_entropy cases at a tiny size, the table; and a tiny run end to end."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks import _util
from benchmarks.bench_linear_loss import (
    TORCH_LCE_CASES,
    Shape,
    build_case,
    check_saliency,
    floor,
    grid,
    lift_logits,
    lift_logprob,
    make_batch,
    markdown_table,
    parse_args,
    unavailable,
)


def test_lift_logprob_equals_lifting_the_logit():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 40, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 40, (50,), generator=g)
    lift = torch.where(torch.rand(50, generator=g) < 0.5, 10 * torch.rand(50, generator=g, dtype=torch.float64), 0.0)
    before = torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
    after = torch.log_softmax(lift_logits(logits.clone(), labels, lift), -1).gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(lift_logprob(before, lift), after)


def test_inputs_exercise_saliency_unlikelihood_and_the_six_percent_rule():
    shape = Shape(n=128, dim=16, vocab=300, dtype="float32", rows_per_sample=16)
    batch = make_batch(shape, torch.device("cpu"), seed=1)
    counts = check_saliency(batch)
    assert counts["saliency"] > 0 and counts["unlikelihood"] > 0 and counts["killed"] > 0, counts
    assert batch.hidden.shape == (3, 128, 16) and batch.weight.shape == (300, 16)
    assert batch.correct.shape == (shape.batch,) and bool(batch.correct.any() & ~batch.correct.all())


def test_floor_adds_matmul_time_and_copy_time():
    shape = Shape(n=256, dim=64, vocab=1000, dtype="bfloat16", rows_per_sample=128)
    rate, bandwidth = 1e12, 1e11
    result = floor(shape, rate, bandwidth)
    matmul_s = 5 * (2 * shape.n * shape.vocab * shape.dim) / rate  # 3 forward + 2 gradient matmuls
    copy_s = 2 * (3 * shape.n * shape.dim + shape.vocab * shape.dim + shape.n * shape.dim + shape.vocab * shape.dim)
    assert math.isclose(result["floor_ms"], 1e3 * (matmul_s + copy_s / bandwidth))


def test_quick_grid_and_skips():
    shapes = grid(parse_args(["--quick"]))
    assert {s.vocab for s in shapes} >= {4096, 32000} and all(s.n % s.rows_per_sample == 0 for s in shapes)
    full = grid(parse_args([]))
    assert {s.vocab for s in full} == {32000, 128256, 151936} and {s.dim for s in full} == {4096}
    cpu = torch.device("cpu")
    assert unavailable("nlft_linear_loss", cpu) == "" and unavailable("materialised", cpu) == ""
    assert unavailable("liger_flce", cpu) and unavailable("cut_cross_entropy", cpu)
    has_lce = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    assert all((unavailable(case, cpu) == "") == has_lce for case in TORCH_LCE_CASES)


@pytest.mark.parametrize("case", TORCH_LCE_CASES)
def test_torch_linear_cross_entropy_cases(case, monkeypatch):
    """torch's linear_cross_entropy: once (the base view) or once per view (teachers with reduction
    "none" under no_grad), with options=None (reference) or LinearCrossEntropyOptions (chunked);
    the weight gradient is the cross-entropy's of the base view."""
    if unavailable(case, torch.device("cpu")):
        pytest.skip(unavailable(case, torch.device("cpu")))
    calls, original = [], F.linear_cross_entropy

    def recorded(*args, **kwargs):
        calls.append((kwargs.get("reduction", "mean"), kwargs["options"], torch.is_grad_enabled()))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "linear_cross_entropy", recorded)
    shape = Shape(n=64, dim=16, vocab=300, dtype="float32", rows_per_sample=16)
    batch = make_batch(shape, torch.device("cpu"), seed=2)
    step, reset = build_case(case, batch)
    step()
    chunked = all(isinstance(options, torch.nn.LinearCrossEntropyOptions) for _, options, _ in calls)
    assert chunked == ("chunked" in case) and all(options is None for _, options, _ in calls) != chunked
    teachers = [("none", False)] * (2 if case.endswith("_x3") else 0)
    assert [(reduction, grad) for reduction, _, grad in calls] == [*teachers, ("mean", True)]
    weight = batch.weight.detach().requires_grad_()
    F.cross_entropy(batch.hidden[0] @ weight.T, batch.labels).backward()
    torch.testing.assert_close(batch.weight.grad, weight.grad, rtol=1e-4, atol=1e-6)
    reset()
    assert batch.weight.grad is None


def test_markdown_table_states_every_case_against_ours():
    """Time and memory of each case as multiples of nlft_linear_loss's (ours: 1.00)."""
    head = {"n": 64, "dim": 32, "vocab": 500, "dtype": "float32", "status": "ok", "note": "", "floor_ms": 1.0}
    payload = {
        "device": "cpu",
        "device_type": "cpu",
        "cpu_threads": 2,
        "versions": {"torch": torch.__version__},
        "matmul_flops_per_s": 1e11,
        "matmul_rate_shape": {"dtype": "float32"},
        "copy_bandwidth_bytes_per_s": 1e10,
        "cases": [
            head | {"case": "nlft_linear_loss", "median_ms": 10.0, "min_ms": 9.0, "x_floor": 10.0},
            head | {"case": "torch_lce_chunked_x3", "median_ms": 40.0, "min_ms": 39.0, "x_floor": 40.0},
        ],
    }
    payload["cases"][0]["peak_extra_bytes"], payload["cases"][1]["peak_extra_bytes"] = 2**21, 2**20
    rows = [line for line in markdown_table(payload).splitlines() if line.startswith("| 64 |")]
    cells = {row.split("|")[5].strip(): [c.strip() for c in row.split("|")[-3:-1]] for row in rows}
    assert cells == {"nlft_linear_loss": ["1.00", "1.00"], "torch_lce_chunked_x3": ["4.00", "0.50"]}


def test_tiny_run_writes_json_table_and_plot(tmp_path):
    """The script end to end on the tiny grid: the fused case measured (its CPU memory in a probe
    subprocess), Liger skipped with its reason, the inputs' counts recorded, the table written."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "linear.json"
    cases = ["nlft_linear_loss", "liger_flce"]
    cmd = [sys.executable, "-m", "benchmarks.bench_linear_loss", "--tiny", "--reps", "1", "--out", str(out)]
    root = _util.REPO_ROOT
    env = os.environ | {"PYTHONPATH": str(root)}
    done = subprocess.run([*cmd, "--cases", *cases], cwd=root, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "bench_linear_loss" and payload["device_type"] in ("cpu", "cuda")
    ours, liger = payload["cases"]
    assert ours["case"] == "nlft_linear_loss" and ours["status"] == "ok", ours
    assert ours["median_ms"] > 0 and ours["peak_extra_bytes"] >= 0 and ours["x_floor"] > 0
    assert ours["exercised"]["saliency"] > 0 and ours["exercised"]["killed"] > 0
    assert liger["status"] == "skipped" and liger["note"]
    table = out.with_suffix(".md").read_text()
    assert table == markdown_table(payload) + "\n" and table in done.stdout
    assert out.with_suffix(".png").stat().st_size > 0
