"""Triton building blocks shared by the kernels (``ops/kernels.py``): the per-lane online
log-sum-exp of a row and its one cross-warp reduction, the softmax-minus-one-hot gradient of a
tile, a streamed view's label log-prob, and the accumulator type.

The first sweep of a row keeps, per lane of its ``[BLOCK_V]`` tile (the elements one thread
owns), a running maximum ``m`` and sum of exponentials ``s`` of the entries that lane saw,
updated elementwise with one exponential per entry (``online_lse``): no reduction across
threads, so no barrier, inside the loop. After the loop the lanes are merged once per row
(``row_stats1/2/3``: one ``tl.reduce`` over the (max, sum) pairs of every view at once).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The running maximum starts finite so that a lane whose entries are all masked to -inf keeps
# s = 0 (exp(-inf - start) = 0) rather than exp(nan). As before the per-lane form, a row whose
# entries all lie below it (none finite above -1e30) gives lse = -inf.
LSE_START = tl.constexpr(-1.0e30)
# exp(x) = exp2(x * LOG2E): Triton's exp2 of float32 is one MUFU.EX2 (flushing results below
# 2**-126 to 0), its exp adds a range fix-up of four instructions around it.
LOG2E = tl.constexpr(1.4426950408889634)
# Tiles per loop iteration in the sweeps (Triton's own unrolling: the loads of both tiles are
# issued before the arithmetic on the first, a remainder loop takes an odd count).
UNROLL = tl.constexpr(2)


@triton.jit
def online_lse(x, m, s):
    """Fold ``x`` into the running max ``m`` and sum ``s`` elementwise (all [BLOCK_V], ACC).

    One exponential per entry: with e = exp(-|x - m|), an entry above the running max rescales
    the sum to s*e + 1 and becomes the max; any other entry adds e. A masked entry (-inf) gives
    e = 0 and leaves both unchanged, whatever the max (LSE_START or finite)."""
    above = x > m
    e = tl.exp2(-tl.abs(x - m) * LOG2E)
    s = tl.where(above, s * e + 1.0, s + e)
    m = tl.where(above, x, m)
    return m, s


@triton.jit
def _merge(m1, s1, m2, s2):
    """The (max, sum) of two disjoint sets of entries from theirs (one exponential)."""
    above = m2 > m1
    e = tl.exp2(-tl.abs(m1 - m2) * LOG2E)
    return tl.where(above, m2, m1), tl.where(above, s1 * e + s2, s1 + s2 * e)


@triton.jit
def _merge2(ma1, sa1, mb1, sb1, ma2, sa2, mb2, sb2):
    ma, sa = _merge(ma1, sa1, ma2, sa2)
    mb, sb = _merge(mb1, sb1, mb2, sb2)
    return ma, sa, mb, sb


@triton.jit
def _merge3(ma1, sa1, mb1, sb1, mc1, sc1, ma2, sa2, mb2, sb2, mc2, sc2):
    ma, sa = _merge(ma1, sa1, ma2, sa2)
    mb, sb = _merge(mb1, sb1, mb2, sb2)
    mc, sc = _merge(mc1, sc1, mc2, sc2)
    return ma, sa, mb, sb, mc, sc


@triton.jit
def row_stats1(m, s):
    """The row's (max, sum) [] from the lanes' [BLOCK_V]: one cross-warp reduction."""
    return tl.reduce((m, s), 0, _merge)


@triton.jit
def row_stats2(ma, sa, mb, sb):
    """Two views' row (max, sum) in one cross-warp reduction."""
    return tl.reduce((ma, sa, mb, sb), 0, _merge2)


@triton.jit
def row_stats3(ma, sa, mb, sb, mc, sc):
    """Three views' row (max, sum) in one cross-warp reduction."""
    return tl.reduce((ma, sa, mb, sb, mc, sc), 0, _merge3)


@triton.jit
def row_lse(m, s, valid):
    """log-sum-exp of a row from its (max, sum); 0 where ``valid`` is false (nothing was read)."""
    return tl.where(valid, m + tl.log(tl.where(valid, s, 1.0)), 0.0)


@triton.jit
def lse_sweep(
    base,
    std,
    judge,
    limit,
    m_b,
    s_b,
    m_s,
    s_s,
    m_j,
    s_j,
    WITH_STD: tl.constexpr,
    WITH_JUDGE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
    BASE_POLICY: tl.constexpr,
    STREAM_POLICY: tl.constexpr,
):
    """Fold entries [0, limit) of the base row, and of the standard and judge rows with
    ``WITH_STD`` / ``WITH_JUDGE``, into the lanes' running (max, sum) [BLOCK_V] of each.

    Full tiles are read without masks, every view's tile loaded before any arithmetic on them;
    the last partial tile is masked (entries at or past ``limit`` are -inf). ``limit`` = 0 runs
    no iteration and reads nothing. Loads carry the eviction policies (``""``: none)."""
    # Three streams keep 48 running statistics a thread (16-bit logits): a second tile's loads in
    # flight on top made ptxas spill a register (it settled at 80 for occupancy), so one tile
    # per iteration there; its three loads are still all issued before the arithmetic.
    TILES: tl.constexpr = 1 if WITH_STD and WITH_JUDGE else UNROLL
    lanes = tl.arange(0, BLOCK_V)
    n_full = limit // BLOCK_V
    for i in tl.range(0, n_full, loop_unroll_factor=TILES):
        cols = i * BLOCK_V + lanes
        x_b = tl.load(base + cols, eviction_policy=BASE_POLICY)
        if WITH_STD:
            x_s = tl.load(std + cols, eviction_policy=STREAM_POLICY)
        if WITH_JUDGE:
            x_j = tl.load(judge + cols, eviction_policy=STREAM_POLICY)
        m_b, s_b = online_lse(x_b.to(ACC), m_b, s_b)
        if WITH_STD:
            m_s, s_s = online_lse(x_s.to(ACC), m_s, s_s)
        if WITH_JUDGE:
            m_j, s_j = online_lse(x_j.to(ACC), m_j, s_j)
    start = n_full * BLOCK_V
    if start < limit:
        cols = start + lanes
        inside = cols < limit
        x_b = tl.load(base + cols, mask=inside, other=float("-inf"), eviction_policy=BASE_POLICY)
        if WITH_STD:
            x_s = tl.load(std + cols, mask=inside, other=float("-inf"), eviction_policy=STREAM_POLICY)
        if WITH_JUDGE:
            x_j = tl.load(judge + cols, mask=inside, other=float("-inf"), eviction_policy=STREAM_POLICY)
        m_b, s_b = online_lse(x_b.to(ACC), m_b, s_b)
        if WITH_STD:
            m_s, s_s = online_lse(x_s.to(ACC), m_s, s_s)
        if WITH_JUDGE:
            m_j, s_j = online_lse(x_j.to(ACC), m_j, s_j)
    return m_b, s_b, m_s, s_s, m_j, s_j


@triton.jit
def grad_sweep(
    x_row, grad_row, V, valid, lse, label, coef, LOGITS_TILE: tl.constexpr, ACC: tl.constexpr, POLICY: tl.constexpr
):
    """grad_row[:V] = coef * (softmax(x_row) - onehot(label)) with the row's ``lse``: reads the
    row only where ``valid`` (else it writes zeros: coef is 0 there), full tiles without masks
    on the store, the last partial tile masked; loads and stores carry ``POLICY``.

    The tile is the first sweep's ``LOGITS_TILE`` narrowed where the gradient is wider than the
    logits (float16 logits, float32 gradient: half), so that a thread stores one 16-byte vector
    of the tile it loaded: with more, Triton loads more per thread than it may store and
    converts between the two through shared memory, with barriers, on every tile."""
    BLOCK_V: tl.constexpr = (
        LOGITS_TILE * x_row.dtype.element_ty.primitive_bitwidth // grad_row.dtype.element_ty.primitive_bitwidth
    )
    lanes = tl.arange(0, BLOCK_V)
    lse2 = lse * LOG2E
    # Masks as comparisons of the lanes with a multiple of the vector width: one predicate per
    # 128-bit access on a GPU, and boolean masks in the interpreter (whose broadcast of a scalar
    # mask is an int64 array).
    read = tl.where(valid, BLOCK_V, 0)
    n_full = V // BLOCK_V
    for i in tl.range(0, n_full, loop_unroll_factor=UNROLL):
        start = i * BLOCK_V
        x = tl.load(x_row + start + lanes, mask=lanes < read, other=0.0, eviction_policy=POLICY).to(ACC)
        g = softmax_grad_tile(x, lanes, start, lse2, label, coef, BLOCK_V)
        tl.store(grad_row + start + lanes, g.to(grad_row.dtype.element_ty), eviction_policy=POLICY)
    start = n_full * BLOCK_V
    if start < V:
        inside = lanes < V - start
        x = tl.load(
            x_row + start + lanes, mask=lanes < tl.where(valid, V - start, 0), other=0.0, eviction_policy=POLICY
        )
        g = softmax_grad_tile(x.to(ACC), lanes, start, lse2, label, coef, BLOCK_V)
        tl.store(grad_row + start + lanes, g.to(grad_row.dtype.element_ty), mask=inside, eviction_policy=POLICY)


@triton.jit
def softmax_grad_tile(x, lanes, start, lse2, label, coef, BLOCK_V: tl.constexpr):
    """coef * (softmax(x) - onehot(label)) on the tile of columns ``start + lanes``, with
    ``lse2`` = lse * LOG2E; ``x`` [BLOCK_V] in the accumulator dtype. Only the one tile that holds
    the label compares columns with it (a branch uniform across the program)."""
    g = coef * tl.exp2(x * LOG2E - lse2)
    if (label >= start) & (label < start + BLOCK_V):
        g = g - tl.where(lanes == label - start, coef, 0.0)
    return g


@triton.jit
def view_logprob(x_label, m, s, use):
    """log p(label) of a streamed view from its label's logit and its row's (max, sum); 0 where
    ``use`` is false."""
    return tl.where(use, x_label - m - tl.log(tl.where(use, s, 1.0)), 0.0)


def tl_acc(dtype: torch.dtype):
    """The Triton accumulator type of logits of ``dtype`` (as ``contracts.acc_dtype``)."""
    return tl.float64 if dtype == torch.float64 else tl.float32
