"""benchmarks/_util.py's harness: grids, run flags, the case loop's OOM / skip / time-budget rows,
probes in fresh processes, result-file names, and the NLFT rows every loss benchmark builds."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks import _util

GRIDS = {
    "tiny": {"n": (32,), "vocab": (10,)},
    "quick": {"n": (64, 128), "vocab": (100,)},
    "full": {"n": (256,), "vocab": (1000, 2000)},
}


def parse(argv: list[str]):
    p = _util.benchmark_parser("benchmarks.fake", "A fake benchmark.\n\nMore.", GRIDS)
    p.add_argument("--n", type=int, nargs="+")
    p.add_argument("--rows-per-sample", type=int)
    _util.add_run_args(p, "fake_<device>_<date>.json", warmup=(7, 2), reps=(30, 4))
    return _util.resolve_run_args(p.parse_args(argv))


def test_grid_choice_and_axis_overrides():
    assert _util.grid_axes(parse([]), GRIDS, ("n", "vocab")) == {"n": (256,), "vocab": (1000, 2000)}
    assert _util.grid_axes(parse(["--quick"]), GRIDS, ("n", "vocab")) == {"n": (64, 128), "vocab": (100,)}
    assert _util.grid_axes(parse(["--tiny", "--n", "48"]), GRIDS, ("n", "vocab")) == {"n": (48,), "vocab": (10,)}
    with pytest.raises(SystemExit):
        parse(["--tiny", "--quick"])
    assert _util.rows_per_sample(parse(["--tiny"]), (32,)) == 16 and _util.rows_per_sample(parse([]), (256,)) == 128
    with pytest.raises(SystemExit, match="not a multiple"):
        _util.rows_per_sample(parse(["--rows-per-sample", "5"]), (64,))


def test_run_defaults_follow_the_device():
    cpu = parse(["--device", "cpu"])
    assert (cpu.warmup, cpu.reps, cpu.seed, cpu.out, cpu.no_plot, cpu.probe) == (2, 4, 0, None, False, None)
    cuda = parse(["--device", "cuda", "--reps", "3"])
    assert (cuda.warmup, cuda.reps) == (7, 3)
    assert not hasattr(cpu, "_run_defaults")


@dataclass(frozen=True)
class FakeShape:
    n: int


def test_run_grid_rows_for_oom_skips_errors_and_the_deadline():
    def make_batch(shape):
        if shape.n == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return [shape.n]

    def measure_case(case, shape, batch):
        assert batch == [shape.n]
        if case == "big":
            raise RuntimeError("CPU out of memory\nsecond line")
        return {"status": "ok", "note": "", "median_ms": float(shape.n)}

    rows = _util.run_grid(
        [FakeShape(1), FakeShape(2)],
        ["ok", "big", "gone"],
        torch.device("cpu"),
        make_batch=make_batch,
        head=lambda shape, batch: {"n": shape.n, "built": batch is not None},
        measure_case=measure_case,
        unavailable=lambda case: "not here" if case == "gone" else "",
        finish=lambda case, shape, row: {"twice_ms": 2 * row["median_ms"]},
    )
    assert rows == [
        {"n": 1, "built": True, "case": "ok", "status": "ok", "note": "", "median_ms": 1.0, "twice_ms": 2.0},
        {"n": 1, "built": True, "case": "big", "status": "oom", "note": "CPU out of memory"},
        {"n": 1, "built": True, "case": "gone", "status": "skipped", "note": "not here"},
        *(
            {"n": 2, "built": False, "case": c, "status": "oom", "note": "inputs do not fit"}
            for c in ("ok", "big", "gone")
        ),
    ]

    def broken(case, shape, batch):
        raise ValueError("a bug, not a result")

    with pytest.raises(ValueError, match="a bug"):
        _util.run_grid(
            [FakeShape(1)],
            ["ok"],
            torch.device("cpu"),
            make_batch=lambda s: [1],
            head=lambda s, b: {},
            measure_case=broken,
        )
    not_run = []
    rows = _util.run_grid(
        [FakeShape(1)],
        ["ok"],
        torch.device("cpu"),
        make_batch=lambda s: None,
        head=lambda s, b: {},
        measure_case=measure_case,
        deadline=_util.Deadline(0),
        not_run=not_run,
    )
    assert rows == [] and not_run == [{"n": 1}]


def test_measure_times_each_call_after_the_warmup_and_resets_before_each():
    calls = []
    row = _util.measure(lambda: calls.append("step"), lambda: calls.append("reset"), torch.device("cpu"), 2, 3)
    assert calls == ["reset", "step"] * 5 + ["reset"]
    assert row["status"] == "ok" and row["reps"] == 3 and row["min_ms"] <= row["median_ms"] <= row["max_ms"]


def test_probe_runs_a_fresh_process_and_reads_its_last_line():
    """benchmarks.bench_loss's probe side, on a tiny shape: the time fields come back as JSON."""
    shape = {"n": 32, "vocab": 20, "dtype": "float32", "rows_per_sample": 16}
    spec = {"case": "cross_entropy", "shape": shape, "seed": 0, "warmup": 1, "reps": 2, "what": "time"}
    row = _util.probe("benchmarks.bench_loss", spec, memory=False)
    assert row["case"] == "cross_entropy" and row["status"] == "ok" and row["reps"] == 2
    memory = _util.probe("benchmarks.bench_loss", spec | {"what": "memory"}, memory=True)
    assert memory["peak_extra_bytes"] >= 0
    with pytest.raises(RuntimeError, match="probe nothing failed"):
        _util.probe("benchmarks.bench_loss", {"no": "spec"}, memory=False, what="nothing")


def test_result_path_and_header():
    cpu = torch.device("cpu")
    path = _util.result_path(None, "bench_x", cpu, sep="-")
    assert path.parent == _util.RESULTS_DIR and path.name == f"bench_x-{_util.device_slug(cpu)}-{_util.today()}.json"
    assert _util.result_path(Path("/tmp/a.json"), "bench_x", cpu) == Path("/tmp/a.json")
    method = {"timing": "t", "memory_cuda": "events", "memory_cpu": "rss"}
    head = _util.payload_header("bench_x", "why?", cpu, "benchmarks.bench_x", ["--quick"], {"reps": 1}, method)
    assert head["method"]["memory"] == "rss" and head["command"] == "python -m benchmarks.bench_x --quick"
    assert head["device_type"] == "cpu" and json.dumps(head)


@pytest.mark.parametrize("n, steps", [(256, 32), (64, 16), (40, 1)])
def test_nlft_rows_lay_out_every_kind_of_sample(n, steps):
    """Sample kinds cycle KINDS; each sample ends in (sample mod 3) padding rows but keeps one; lifted rows
    are response rows of the kinds they belong to; wrong_one samples have exactly one judge lift."""
    rows = _util.nlft_rows(n, steps, 50, torch.Generator().manual_seed(n), torch.device("cpu"))
    batch = n // steps
    assert rows.correct.tolist() == [_util.KINDS[b % 4] == "correct" for b in range(batch)]
    labels = rows.labels.view(batch, steps)
    for b in range(batch):
        pad = _util.padding_rows(b, steps)
        assert (labels[b, steps - pad :] == -100).all() and (labels[b, : steps - pad] >= 0).all()
        kind = _util.KINDS[b % 4]
        standard, judge = rows.lift_standard.view(batch, steps)[b], rows.lift_judge.view(batch, steps)[b]
        assert not (standard | judge)[steps - pad :].any()
        assert not standard.any() or kind == "correct"
        assert int(judge.sum()) == {"correct": 0, "wrong_many": int(judge.sum()), "wrong_one": 1, "wrong_none": 0}[kind]
    if steps >= 16:
        assert rows.lift_standard.any() and rows.lift_judge.view(batch, steps)[1::4].sum(1).gt(1).any()


def test_time_ms_on_the_cpu_times_each_call_once():
    """timeit with torch.utils.benchmark's clock: exactly ``reps`` timed calls, each the call's own time."""
    calls = []

    def step():
        calls.append("step")
        time.sleep(0.01)

    times = _util.time_ms(step, lambda: calls.append("reset"), torch.device("cpu"), warmup=1, reps=4)
    assert len(times) == 4 and calls == ["reset", "step"] * 5
    assert all(9 < t < 500 for t in times), times
    out, ms = _util.timed(lambda: (time.sleep(0.02), "done")[1], torch.device("cpu"))
    assert out == "done" and 19 < ms < 500


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the harness times through do_bench there")
def test_time_ms_on_cuda_goes_through_do_bench():
    device = torch.device("cuda")
    src = torch.randn(1 << 27, device=device)  # 512 MiB: far beyond the L2
    dst = torch.empty_like(src)
    resets = []
    times = _util.time_ms(lambda: dst.copy_(src), lambda: resets.append(1), device, warmup=3, reps=20)
    assert 10 <= len(times) <= 40 and min(times) > 0, times
    assert len(resets) >= len(times) + 5  # before every call, do_bench's own estimates included
    rate = 2 * src.numel() * 4 / (_util.median(times) / 1e3)
    assert 1e11 < rate < 2e13, rate  # a copy's bytes per second, not a launch's
    _, ms = _util.timed(lambda: dst.copy_(src), device)
    assert ms > 0.5 * _util.median(times)  # the clock synchronises: the queued copy is counted
