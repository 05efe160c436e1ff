"""The Triton kernels and their launchers: the backend ``triton`` of ``nlft_kernels.backends``.

- ``_nlft_fwd_kernel``: the NLFT row pass (log-softmax statistics of up to three views, the
  row rule, the provisional gradient ``coef * (softmax - onehot)`` of the base logits);
- ``_scale_rows_kernel``: the per-sample stage's fix-up of a few gradient rows;
- ``_token_logprobs_kernel`` / ``_token_logprobs_bwd_kernel``: label log-probs and their gradient.

Launch shapes come from ``ops/launch.py`` (``launch_config``), the rule's constants from
``RuleConstants`` by keyword (``ops/contracts.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.contracts import RuleConstants, acc_dtype
from nlft_kernels.ops.inputs import Views
from nlft_kernels.ops.launch import launch_config, row_pass_buffers
from nlft_kernels.ops.tl_utils import LSE_START, lse_tile, softmax_grad_tile, tl_acc, view_logprob


@triton.jit
def _nlft_fwd_kernel(
    base_ptr,
    base_sb,
    base_st,
    std_ptr,
    std_sb,
    std_st,
    judge_ptr,
    judge_sb,
    judge_st,
    labels_ptr,
    wrong_ptr,
    scale_ptr,
    stats_ptr,
    saliency_ptr,
    grad_ptr,
    N,
    T,
    V,
    ignore_index,
    tau,
    saliency_power,
    other_power,
    log_ratio,
    log_judge_min,
    sigmoid_center,
    sigmoid_scale,
    unlikelihood_clamp,
    nll_weight,
    STD: tl.constexpr,
    JUDGE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    """One program per row (grid N = B*T).

    Reads: the base logits row [V], the standard and judge rows [V] when given as logits (the
    judge row only for rows of wrong samples) or one log-prob each, the label, the sample's
    correctness (int8) and the row scale. Writes: log-probs of the three views to
    stats [3, N] (ACC), the saliency flag (int8 [N]) and, with COMPUTE_GRAD, the gradient row
    grad[row, :V] in the logits dtype. Bytes: every given logits row once, the base row twice
    (the second sweep is the gradient), the gradient row once.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    # With validate=False nobody checked the label: never read outside the row for it.
    in_range = (label >= 0) & (label < V)
    wrong = tl.load(wrong_ptr + row) != 0
    use_judge = valid & wrong
    base_off = b * base_sb + t * base_st
    std_off = b * std_sb + t * std_st
    judge_off = b * judge_sb + t * judge_st
    # Ignored rows read nothing; correct rows never read the judge view.
    limit = tl.where(valid, V, 0)
    limit_judge = tl.where(use_judge, V, 0)

    m_b = tl.full([], LSE_START, ACC)
    s_b = tl.zeros([], ACC)
    m_s = tl.full([], LSE_START, ACC)
    s_s = tl.zeros([], ACC)
    m_j = tl.full([], LSE_START, ACC)
    s_j = tl.zeros([], ACC)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        m_b, s_b = lse_tile(base_ptr + base_off, cols, limit, m_b, s_b, ACC)
        if STD == 1:
            m_s, s_s = lse_tile(std_ptr + std_off, cols, limit, m_s, s_s, ACC)
        if JUDGE == 1:
            m_j, s_j = lse_tile(judge_ptr + judge_off, cols, limit_judge, m_j, s_j, ACC)

    lse_b = tl.where(valid, m_b + tl.log(tl.where(valid, s_b, 1.0)), 0.0)
    x_label = tl.load(base_ptr + base_off + label, mask=valid & in_range, other=float("nan")).to(ACC)
    lp_b = tl.where(valid, x_label - lse_b, 0.0)
    if STD == 1:
        lp_s = view_logprob(std_ptr, std_off, m_s, s_s, label, valid, in_range, ACC)
    else:
        lp_s = tl.where(valid, tl.load(std_ptr + row, mask=valid, other=0.0).to(ACC), 0.0)
    if JUDGE == 1:
        lp_j = view_logprob(judge_ptr, judge_off, m_j, s_j, label, use_judge, in_range, ACC)
    elif JUDGE == 2:
        lp_j = tl.where(use_judge, tl.load(judge_ptr + row, mask=use_judge, other=0.0).to(ACC), 0.0)
    else:
        lp_j = tl.zeros([], ACC)

    # The row rule (ops/row_rule.py, csrc/row_rule.h).
    # Correct response: saliency p_s > tau; weight 1 + u**P on saliency, (p_s / tau)**Q else.
    p_s = tl.exp(lp_s)
    saliency_correct = p_s > tau
    u = tl.maximum((p_s - tau) / (1.0 - tau), 1e-30)
    w_correct = tl.where(
        saliency_correct, 1.0 + tl.exp(saliency_power * tl.log(u)), tl.exp(other_power * (lp_s - tl.log(tau)))
    )
    # Wrong response: saliency r1 > k, r2 > k, p_j > min, trained by unlikelihood; sqrt(p_s) else.
    log_r1 = lp_j - lp_b
    saliency_wrong = (log_r1 > log_ratio) & (lp_j - lp_s > log_ratio) & (lp_j > log_judge_min)
    w_unlikely = sigmoid_scale / (1.0 + tl.exp(sigmoid_center - tl.exp(log_r1)))
    p_b = tl.exp(lp_b)
    one_minus = 1.0 - p_b
    coef_unlikely = tl.where(
        one_minus >= unlikelihood_clamp, -w_unlikely * p_b / tl.maximum(one_minus, unlikelihood_clamp), 0.0
    )
    coef_wrong = tl.where(saliency_wrong, coef_unlikely, tl.sqrt(p_s))
    coef = tl.where(wrong, coef_wrong, w_correct + nll_weight)
    coef = tl.where(valid, coef * tl.load(scale_ptr + row).to(ACC), 0.0)
    # A label outside [0, V): a NaN gradient row even where the teachers are log-probs, and no
    # saliency (as decide_row in csrc/row_rule.h).
    coef = tl.where(valid & ~in_range, float("nan"), coef)
    saliency = tl.where(wrong, saliency_wrong, saliency_correct) & valid & in_range

    tl.store(stats_ptr + row, lp_b)
    tl.store(stats_ptr + N + row, lp_s)
    tl.store(stats_ptr + 2 * N + row, lp_j)
    tl.store(saliency_ptr + row, saliency.to(tl.int8))

    if COMPUTE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x_b = tl.load(base_ptr + base_off + cols, mask=cols < limit, other=0.0).to(ACC)
            g = softmax_grad_tile(x_b, cols, lse_b, label, coef)
            tl.store(grad_ptr + row * V + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _scale_rows_kernel(grad_ptr, factor_ptr, V, BLOCK_V: tl.constexpr):
    """One program per row: grad[row] *= factor[row]; rows whose factor is 1 move no bytes."""
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(factor_ptr + row)
    limit = tl.where(factor != 1.0, V, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        g = tl.load(grad_ptr + row * V + cols, mask=cols < limit, other=0.0).to(tl.float32)
        tl.store(grad_ptr + row * V + cols, (g * factor).to(grad_ptr.dtype.element_ty), mask=cols < limit)


@triton.jit
def _token_logprobs_kernel(
    x_ptr,
    stride_b,
    stride_t,
    labels_ptr,
    lp_ptr,
    lse_ptr,
    T,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    """One program per row (grid N = B*T): lp[row] = x[row, label] - lse(x[row]), lse saved.

    Reads the [V] logits row once (any float dtype), writes two ACC scalars; ignored rows read
    nothing and get lp = 0.
    """
    row = tl.program_id(0).to(tl.int64)
    base = (row // T) * stride_b + (row % T) * stride_t
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    limit = tl.where(valid, V, 0)  # ignored rows read nothing
    m = tl.full([], LSE_START, ACC)
    s = tl.zeros([], ACC)
    for start in range(0, V, BLOCK_V):
        m, s = lse_tile(x_ptr + base, start + tl.arange(0, BLOCK_V), limit, m, s, ACC)
    lse = m + tl.log(tl.where(valid, s, 1.0))
    # With validate=False nobody checked the label: NaN rather than a read outside the row.
    in_range = (label >= 0) & (label < V)
    x_label = tl.load(x_ptr + base + label, mask=valid & in_range, other=float("nan")).to(ACC)
    tl.store(lp_ptr + row, tl.where(valid, x_label - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    x_ptr,
    stride_b,
    stride_t,
    labels_ptr,
    lse_ptr,
    g_ptr,
    grad_ptr,
    T,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
):
    """One program per row: grad[row] = g[row] * (onehot(label) - softmax(x[row])).

    Reads the [V] row and writes the [V] gradient row (contiguous, logits dtype); ignored rows
    read nothing and write zeros.
    """
    row = tl.program_id(0).to(tl.int64)
    base = (row // T) * stride_b + (row % T) * stride_t
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    lse = tl.load(lse_ptr + row)
    coef = tl.where(valid, -tl.load(g_ptr + row).to(ACC), 0.0)
    limit = tl.where(valid, V, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_ptr + base + cols, mask=cols < limit, other=0.0).to(ACC)
        g = softmax_grad_tile(x, cols, lse, label, coef)
        tl.store(grad_ptr + row * V + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)


# ---------------------------------------------------------------------------------------------
# Launchers: the ``triton`` entries of the backend registry (nlft_kernels/backends.py).


def _row_strides(view: torch.Tensor) -> tuple[int, int]:
    return (view.stride(0), view.stride(1)) if view.dim() == 3 else (0, 0)


def row_pass(v: Views, cfg: NLFTConfig, compute_grad: bool, inplace_grad: bool = False):
    """The row pass (see ``stages.first_stage``): (stats [3, N], saliency [N] bool, gradient or None).

    ``inplace_grad``: the gradient is written over the contiguous base logits (each program
    reads its row's tile before it writes it) and ``v.base`` is returned as the gradient."""
    base = v.base
    n, vocab = v.labels.numel(), base.shape[-1]
    stats, grad = row_pass_buffers(base, n, compute_grad and not inplace_grad)
    if compute_grad and inplace_grad:
        assert base.is_contiguous(), "an in-place gradient needs contiguous base logits"
        grad = base
    saliency = torch.empty(n, dtype=torch.int8, device=base.device)
    std, judge = v.standard, v.judge if v.judge is not None else v.standard
    launch = launch_config("row_pass", vocab, v.streams, base.dtype)
    _nlft_fwd_kernel[(n,)](
        base,
        base.stride(0),
        base.stride(1),
        std,
        *_row_strides(std),
        judge,
        *_row_strides(judge),
        v.labels,
        v.wrong.to(torch.int8),
        v.scale,
        stats,
        saliency,
        stats if grad is None else grad,  # never written without COMPUTE_GRAD
        n,
        base.shape[1],
        vocab,
        **RuleConstants.of(cfg).kwargs(),
        STD=int(v.standard_mode),
        JUDGE=int(v.judge_mode),
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=launch.block_v,
        ACC=tl_acc(base.dtype),
        num_warps=launch.num_warps,
    )
    return stats, saliency.bool(), grad


def scale_rows(grad: torch.Tensor, factor: torch.Tensor, rows: torch.Tensor) -> None:
    """grad[r] *= factor[r] for the rows ``rows`` of ``grad`` [..., V], in place."""
    flat = grad.view(-1, grad.shape[-1])
    full = torch.ones(flat.shape[0], dtype=torch.float32, device=grad.device)
    full[rows] = factor[rows].float()
    launch = launch_config("scale_rows", flat.shape[1], 1, flat.dtype)
    _scale_rows_kernel[(flat.shape[0],)](flat, full, flat.shape[1], BLOCK_V=launch.block_v, num_warps=launch.num_warps)


def _launch_label_kernel(kernel, x: torch.Tensor, labels: torch.Tensor, buffers, ignore_index: int) -> None:
    launch = launch_config("token_logprobs", x.shape[-1], 1, x.dtype)
    kernel[(labels.numel(),)](
        x,
        x.stride(0),
        x.stride(1),
        labels,
        *buffers,
        x.shape[1],
        x.shape[2],
        ignore_index,
        BLOCK_V=launch.block_v,
        ACC=tl_acc(x.dtype),
        num_warps=launch.num_warps,
    )


def label_logprobs(x: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label) [N], lse [N]) in ACC of ``x`` [B, T, V] and contiguous ``labels`` [N]."""
    lp = torch.empty(labels.numel(), dtype=acc_dtype(x.dtype), device=x.device)
    lse = torch.empty_like(lp)
    _launch_label_kernel(_token_logprobs_kernel, x, labels, (lp, lse), ignore_index)
    return lp, lse


def label_logprobs_backward(x, labels, lse, g, ignore_index: int) -> torch.Tensor:
    """The gradient [B, T, V] of ``x`` for the upstream gradient ``g`` [N] of the log-probs."""
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_label_kernel(_token_logprobs_bwd_kernel, x, labels, (lse, g.contiguous(), grad), ignore_index)
    return grad
