"""The pure parts of benchmarks/bench_linear_loss.py: label lifts, inputs that exercise the rule, the floor."""

import math

import torch

from benchmarks.bench_linear_loss import (
    Shape,
    check_saliency,
    floor,
    grid,
    lift_logits,
    lift_logprob,
    make_batch,
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
