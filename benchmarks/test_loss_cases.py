"""pytest-benchmark cases of ``benchmarks/bench_loss.py``: the same inputs and cases, timed by
pytest-benchmark (for users who keep and compare runs with its ``--benchmark-autosave`` /
``--benchmark-compare``).

  pytest benchmarks/test_loss_cases.py --benchmark-only                 # quick grid on CPU, full on CUDA
  NLFT_BENCH_GRID=full pytest benchmarks/test_loss_cases.py --benchmark-json out.json

``NLFT_BENCH_GRID`` picks bench_loss's grid: ``tiny``, ``quick`` (CPU default) or ``full`` (CUDA
default). The torch.compile case runs last: on the CPU it leaves OpenMP threads spinning that
slow whatever runs after it in the same process (bench_loss.py measures each case in a fresh
process for that reason; prefer its figures on the CPU).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from benchmarks import _util
from benchmarks.bench_loss import CASES, GRIDS, LIGER, Shape, build_case, liger_unavailable, make_batch

DEVICE = _util.pick_device(None)
GRID_NAME = os.environ.get("NLFT_BENCH_GRID", "full" if DEVICE.type == "cuda" else "quick")
if GRID_NAME not in GRIDS:
    raise ValueError(f"NLFT_BENCH_GRID must be one of {sorted(GRIDS)}, got {GRID_NAME!r}")
GRID = GRIDS[GRID_NAME]
ROWS_PER_SAMPLE = 16 if GRID_NAME == "tiny" else 128
SHAPES = [Shape(n, v, d, ROWS_PER_SAMPLE) for d in GRID["dtype"] for v in GRID["vocab"] for n in GRID["n"]]
# The compiled cases after the others (their OpenMP threads), Liger last (it overwrites its input).
ORDER = [c for c in CASES if not c.startswith("compiled") and c != LIGER] + [
    c for c in CASES if c.startswith("compiled")
]
ORDER.append(LIGER)


@functools.lru_cache(maxsize=1)
def _batch(shape: Shape):
    """The inputs of ``shape``, kept while consecutive tests use them (one shape at a time: the
    full grid's inputs do not fit together)."""
    return make_batch(shape, DEVICE)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s.n}-V{s.vocab}-{s.dtype}")
@pytest.mark.parametrize("case", ORDER)
def test_loss(benchmark, shape: Shape, case: str) -> None:
    """Forward+backward of one loss of ``case`` on ``shape`` (gradient dropped between rounds)."""
    if case == LIGER and (why := liger_unavailable(DEVICE)):
        pytest.skip(why)
    step, reset = build_case(case, _batch(shape), shape)

    def run() -> None:
        step()
        _sync()

    benchmark.extra_info.update(
        n=shape.n, vocab=shape.vocab, dtype=shape.dtype, logits_bytes=shape.n * shape.vocab * shape.elem
    )
    benchmark.pedantic(run, setup=reset, rounds=20 if DEVICE.type == "cuda" else 3, warmup_rounds=1)
