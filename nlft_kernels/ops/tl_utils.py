"""Triton building blocks shared by the kernels (``ops/kernels.py``): the online log-sum-exp
update of one vocabulary tile, the softmax-minus-one-hot gradient of a tile, a streamed view's
label log-prob, and the accumulator type."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The running maximum starts finite so that a tile whose entries are all masked to -inf
# gives exp(-inf - start) = 0 rather than exp(nan).
LSE_START = tl.constexpr(-1.0e30)


@triton.jit
def lse_update(x, m, s):
    """Fold tile ``x`` [BLOCK_V] into the running max ``m`` and sum of exponentials ``s``."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
    return m_new, s


@triton.jit
def softmax_grad_tile(x, cols, lse, label, coef):
    """coef * (softmax(x) - onehot(label)) on one tile; ``x`` [BLOCK_V] in the accumulator dtype."""
    return coef * (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0))


@triton.jit
def view_logprob(ptr, offset, m, s, label, use, in_range, ACC: tl.constexpr):
    """log p(label) of a streamed view from its running (max, sum); 0 where ``use`` is false,
    NaN where the label is outside [0, V) (nothing outside the row is read)."""
    x_label = tl.load(ptr + offset + label, mask=use & in_range, other=float("nan")).to(ACC)
    return tl.where(use, x_label - m - tl.log(tl.where(use, s, 1.0)), 0.0)


def tl_acc(dtype: torch.dtype):
    """The Triton accumulator type of logits of ``dtype`` (as ``contracts.acc_dtype``)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def lse_tile(row_ptr, cols, limit, m, s, ACC: tl.constexpr):
    """Load the tile ``cols`` of a row (entries at or past ``limit`` as -inf) and fold it into
    the running (max, sum)."""
    x = tl.load(row_ptr + cols, mask=cols < limit, other=float("-inf")).to(ACC)
    return lse_update(x, m, s)
