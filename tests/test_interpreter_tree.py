"""The interpreter's reduction with a combine function, replaced by a tree (tests/interpreter_tree.py):
the same results as NumPy's reductions for an exact combine, on every axis and odd sizes, and
the row kernels' (max, sum) merge as accurate as the GPU's tree where the fold was not."""

import numpy as np
import pytest
import torch

from tests.conftest import INTERPRETER_TREE

pytestmark = pytest.mark.skipif(INTERPRETER_TREE is not None, reason=f"no tree reduction: {INTERPRETER_TREE}")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nlft_kernels.ops.tl_utils import LSE_START, online_lse, row_stats1  # noqa: E402


@triton.jit
def _add_max(a, b, c, d):
    return a + c, tl.maximum(b, d)


@triton.jit
def _reduce_2d(x_ptr, sum_ptr, max_ptr, R: tl.constexpr, C: tl.constexpr, AXIS: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :])
    s, m = tl.reduce((x, x), AXIS, _add_max)
    n: tl.constexpr = C if AXIS == 0 else R
    tl.store(sum_ptr + tl.arange(0, n), s)
    tl.store(max_ptr + tl.arange(0, n), m)


@pytest.mark.parametrize("axis", [0, 1])
def test_tree_matches_numpy_for_an_exact_combine(axis):
    """Integers in float64 add exactly in any order: the tree's sums and maxima are NumPy's."""
    g = torch.Generator().manual_seed(11)
    x = torch.randint(-1000, 1000, (8, 4), generator=g).double()
    n = 4 if axis == 0 else 8
    sums, maxs = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    _reduce_2d[(1,)](x, sums, maxs, 8, 4, axis)
    assert torch.equal(sums, x.sum(axis)) and torch.equal(maxs, x.amax(axis))


@triton.jit
def _row_stats(x_ptr, out_ptr, V, B: tl.constexpr):
    m = tl.full([B], LSE_START, tl.float32)
    s = tl.zeros([B], tl.float32)
    lanes = tl.arange(0, B)
    for i in range(0, V // B):
        m, s = online_lse(tl.load(x_ptr + i * B + lanes), m, s)
    m, s = row_stats1(m, s)
    tl.store(out_ptr, m)
    tl.store(out_ptr + 1, s)


def test_peaked_row_sum_as_accurate_as_a_tree():
    """One entry 12 above 4095 zeros, 2048 lanes: the exact sum is 1 + 4095 exp(-12). A
    left-to-right fold of the lanes loses 2e-5 of it in float32; the tree keeps it to 1e-6."""
    x = torch.zeros(4096)
    x[3] = 12.0
    out = torch.empty(2)
    _row_stats[(1,)](x, out, 4096, 2048)
    exact = 1 + 4095 * np.exp(-12.0)
    assert out[0].item() == 12.0
    assert abs(out[1].item() - exact) / exact < 1e-6, (out[1].item(), exact)
