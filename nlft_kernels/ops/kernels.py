"""The Triton kernels and their launchers: the backend ``triton`` of ``nlft_kernels.backends``.

- ``_nlft_fwd_kernel``: the NLFT row pass (log-softmax statistics of up to three views, the
  row rule, the provisional gradient ``coef * (softmax - onehot)`` of the base logits);
- ``_scale_rows_kernel``: backward's one pass over a stored gradient: the per-sample fix-up and
  ``grad_output``, skipping rows whose total factor is 1;
- ``_token_logprobs_kernel`` / ``_token_logprobs_bwd_kernel``: label log-probs and the gradient
  ``coef * (softmax - onehot)`` from a saved lse (``softmax_grad``);
- ``_token_logprobs_grad_kernel``: both in one launch, the gradient written in forward (the
  token-weighted cross-entropy's row pass).

Launch shapes come from ``ops/launch.py`` (``launch_config``), the rule's constants from
``RuleConstants`` by keyword (``ops/contracts.py``). Every launch runs under the device guard of
its tensors (``_device_of``): Triton launches on the current CUDA device, which in a process
that uses several GPUs need not be theirs.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.contracts import RuleConstants, acc_dtype
from nlft_kernels.ops.inputs import Views
from nlft_kernels.ops.launch import launch_config, row_pass_buffers
from nlft_kernels.ops.tl_utils import (
    LSE_START,
    grad_sweep,
    lse_sweep,
    row_lse,
    row_stats1,
    row_stats2,
    row_stats3,
    tl_acc,
    view_logprob,
)

# Whether the kernels below were decorated for Triton's interpreter (TRITON_INTERPRET=1 when this
# module was imported): they then run on CPU tensors through it. The AOT compile
# (tests/ops/compile_kernels.py) sets the variable only after importing, to record launches.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def label_logits(
    base, std, judge, label, valid, use_judge, in_range, STD: tl.constexpr, JUDGE: tl.constexpr, ACC: tl.constexpr
):
    """The label's logit in the base row and, where given as logits (``STD``/``JUDGE`` == 1), the
    standard and judge rows (the judge's only for ``use_judge``): three ACC scalars, NaN for a
    label outside [0, V) (nothing outside the row is read); a view not given repeats the base's."""
    x_b = tl.load(base + label, mask=valid & in_range, other=float("nan")).to(ACC)
    x_s = x_b
    x_j = x_b
    if STD == 1:
        x_s = tl.load(std + label, mask=valid & in_range, other=float("nan")).to(ACC)
    if JUDGE == 1:
        x_j = tl.load(judge + label, mask=use_judge & in_range, other=float("nan")).to(ACC)
    return x_b, x_s, x_j


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
    EVICT: tl.constexpr,
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
    # Ignored rows read nothing (a loop bound of 0); correct rows never read the judge view.
    limit = tl.where(valid, V, 0)
    KEEP: tl.constexpr = "evict_last" if EVICT else ""
    STREAM: tl.constexpr = "evict_first" if EVICT else ""

    # The row's scalars, read before the sweep: one register each across it instead of a
    # pointer (two), and their latency hidden behind it; with three logits views the sweep
    # holds three views' statistics and the scale is read after it (ptxas spilled it across
    # the sweep in float32 and float64 variants at 64 registers).
    THREE_VIEWS: tl.constexpr = (STD == 1) and (JUDGE == 1)
    if not THREE_VIEWS:
        scale = tl.load(scale_ptr + row).to(ACC)
    if STD != 1:
        lp_s = tl.where(valid, tl.load(std_ptr + row, mask=valid, other=0.0).to(ACC), 0.0)
    if JUDGE == 2:
        lp_j = tl.where(use_judge, tl.load(judge_ptr + row, mask=use_judge, other=0.0).to(ACC), 0.0)
    # The label's logit of each logits view. Without a gradient, read before the sweep: no row
    # pointer then lives past it (ptxas spilled the judge row's pointer across the two sweeps of
    # the three-view variants at 80 registers on sm_80). With one, after it: the gradient sweep
    # keeps the base row's pointer anyway, and three more values held across the first sweep
    # made ptxas spill at 64 registers (float32 and float64 on sm_90).
    if not COMPUTE_GRAD:
        x_b, x_s, x_j = label_logits(
            base_ptr + base_off, std_ptr + std_off, judge_ptr + judge_off, label, valid, use_judge, in_range,
            STD, JUDGE, ACC,
        )  # fmt: skip

    # First sweep: per-lane running (max, sum) of each logits view (ops/tl_utils.py).
    m_b = tl.full([BLOCK_V], LSE_START, ACC)
    s_b = tl.zeros([BLOCK_V], ACC)
    m_s, s_s, m_j, s_j = m_b, s_b, m_b, s_b
    base, std, judge = base_ptr + base_off, std_ptr + std_off, judge_ptr + judge_off
    if JUDGE == 1:
        if use_judge:
            m_b, s_b, m_s, s_s, m_j, s_j = lse_sweep(
                base, std, judge, limit, m_b, s_b, m_s, s_s, m_j, s_j, STD == 1, True, BLOCK_V, ACC, KEEP, STREAM
            )
        else:
            m_b, s_b, m_s, s_s, m_j, s_j = lse_sweep(
                base, std, judge, limit, m_b, s_b, m_s, s_s, m_j, s_j, STD == 1, False, BLOCK_V, ACC, KEEP, STREAM
            )
    else:
        m_b, s_b, m_s, s_s, m_j, s_j = lse_sweep(
            base, std, judge, limit, m_b, s_b, m_s, s_s, m_j, s_j, STD == 1, False, BLOCK_V, ACC, KEEP, STREAM
        )
    # One cross-warp reduction per row for all the views' (max, sum).
    if STD == 1:
        if JUDGE == 1:
            m_b, s_b, m_s, s_s, m_j, s_j = row_stats3(m_b, s_b, m_s, s_s, m_j, s_j)
        else:
            m_b, s_b, m_s, s_s = row_stats2(m_b, s_b, m_s, s_s)
    elif JUDGE == 1:
        m_b, s_b, m_j, s_j = row_stats2(m_b, s_b, m_j, s_j)
    else:
        m_b, s_b = row_stats1(m_b, s_b)

    if THREE_VIEWS:
        scale = tl.load(scale_ptr + row).to(ACC)
    lse_b = row_lse(m_b, s_b, valid)
    if COMPUTE_GRAD:
        x_b, x_s, x_j = label_logits(
            base_ptr + base_off, std_ptr + std_off, judge_ptr + judge_off, label, valid, use_judge, in_range,
            STD, JUDGE, ACC,
        )  # fmt: skip
    lp_b = tl.where(valid, x_b - lse_b, 0.0)
    if STD == 1:
        lp_s = view_logprob(x_s, m_s, s_s, valid)
    if JUDGE == 1:
        lp_j = view_logprob(x_j, m_j, s_j, use_judge)
    elif JUDGE == 0:
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
    # ``use_judge`` (= valid & wrong) stands for ``wrong`` from here: the two differ only on
    # ignored rows, whose coefficient and saliency are masked below, and ``wrong`` need not be
    # kept across the sweep (ptxas put it in a stack slot in three-view variants).
    coef = tl.where(use_judge, coef_wrong, w_correct + nll_weight)
    coef = tl.where(valid, coef * scale, 0.0)
    # A label outside [0, V): a NaN gradient row even where the teachers are log-probs, and no
    # saliency (as decide_row in csrc/row_rule.h).
    coef = tl.where(valid & ~in_range, float("nan"), coef)
    saliency = tl.where(use_judge, saliency_wrong, saliency_correct) & valid & in_range

    tl.store(stats_ptr + row, lp_b)
    tl.store(stats_ptr + N + row, lp_s)
    tl.store(stats_ptr + 2 * N + row, lp_j)
    tl.store(saliency_ptr + row, saliency.to(tl.int8))

    if COMPUTE_GRAD:
        # Second sweep: the base row again (in L2 where its first-sweep reads were kept there).
        grad_sweep(base, grad_ptr + row * V, V, valid, lse_b, label, coef, BLOCK_V, ACC, STREAM)


@triton.jit
def _scale_rows_kernel(grad_ptr, factor_ptr, V, BLOCK_V: tl.constexpr):
    """One program per row (grid R): grad[row, :V] *= factor[row], in place, in the factor's
    type (float32, float64 for float64 gradients). Bytes: none for a row whose factor is 1; the
    row written once (zeros, nothing read) for a factor of 0; read and written once otherwise."""
    row = tl.program_id(0).to(tl.int64)
    factor = tl.load(factor_ptr + row)
    write = tl.where(factor != 1.0, V, 0)
    read = tl.where(factor != 0.0, write, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        g = tl.load(grad_ptr + row * V + cols, mask=cols < read, other=0.0).to(factor.dtype)
        tl.store(grad_ptr + row * V + cols, (g * factor).to(grad_ptr.dtype.element_ty), mask=cols < write)


@triton.jit
def row_logprob(
    x_ptr, stride_b, stride_t, labels_ptr, lp_ptr, lse_ptr, T, V, ignore_index,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr, POLICY: tl.constexpr,
):  # fmt: skip
    """This program's row (grid N = B*T): lp[row] = x[row, label] - lse(x[row]) and lse stored
    (ACC); the row read once with eviction ``POLICY``, nothing for an ignored row (lp = lse = 0).
    Returns (row, the row's pointer, label, valid, lse) for a kernel that goes on with the row."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // T) * stride_b + (row % T) * stride_t
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    limit = tl.where(valid, V, 0)  # ignored rows read nothing: a loop bound of 0
    m = tl.full([BLOCK_V], LSE_START, ACC)
    s = tl.zeros([BLOCK_V], ACC)
    m, s, _, _, _, _ = lse_sweep(
        x_row, x_row, x_row, limit, m, s, m, s, m, s, False, False, BLOCK_V, ACC, POLICY, POLICY
    )
    m, s = row_stats1(m, s)
    lse = row_lse(m, s, valid)  # finite (0) on ignored rows
    # With validate=False nobody checked the label: NaN rather than a read outside the row.
    in_range = (label >= 0) & (label < V)
    x_label = tl.load(x_row + label, mask=valid & in_range, other=float("nan")).to(ACC)
    tl.store(lp_ptr + row, tl.where(valid, x_label - lse, 0.0))
    tl.store(lse_ptr + row, lse)
    return row, x_row, label, valid, lse


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
    EVICT: tl.constexpr,
):
    """One program per row (grid N = B*T): lp[row] = x[row, label] - lse(x[row]), lse saved.

    Reads the [V] logits row once (any float dtype), writes two ACC scalars; ignored rows read
    nothing and get lp = 0.
    """
    STREAM: tl.constexpr = "evict_first" if EVICT else ""
    row_logprob(x_ptr, stride_b, stride_t, labels_ptr, lp_ptr, lse_ptr, T, V, ignore_index, BLOCK_V, ACC, STREAM)


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
    EVICT: tl.constexpr,
):
    """One program per row: grad[row] = g[row] * (onehot(label) - softmax(x[row])).

    Reads the [V] row and writes the [V] gradient row (contiguous, logits dtype; it may be the
    logits themselves); ignored rows and rows whose g is 0 read nothing and write zeros.
    """
    row = tl.program_id(0).to(tl.int64)
    base = (row // T) * stride_b + (row % T) * stride_t
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    lse = tl.load(lse_ptr + row)
    coef = tl.where(valid, -tl.load(g_ptr + row).to(ACC), 0.0)
    STREAM: tl.constexpr = "evict_first" if EVICT else ""
    # Rows whose gradient is 0 (ignored, or g = 0) are written as zeros unread.
    grad_sweep(x_ptr + base, grad_ptr + row * V, V, valid & (coef != 0.0), lse, label, coef, BLOCK_V, ACC, STREAM)


@triton.jit
def _token_logprobs_grad_kernel(
    x_ptr,
    stride_b,
    stride_t,
    labels_ptr,
    coef_ptr,
    lp_ptr,
    lse_ptr,
    grad_ptr,
    T,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ACC: tl.constexpr,
    EVICT: tl.constexpr,
):
    """One program per row (grid N = B*T): ``_token_logprobs_kernel``'s lp and lse, and in a second
    sweep of the same program grad[row] = coef[row] * (softmax(x[row]) - onehot(label)): the
    token-weighted cross-entropy's row pass, its gradient written in forward.

    Reads the [V] row once (the second sweep re-reads it: from L2 on a GPU, the same program read
    it just before), the label entry and coef; writes two ACC scalars and the [V] gradient row
    (contiguous, logits dtype; it may be the logits themselves: each tile is read before it is
    written). Ignored rows read nothing; rows whose coef is 0 are not read a second time; both
    get zeros.
    """
    # The first sweep keeps the row in L2 for the second (evict_last), which streams it out.
    KEEP: tl.constexpr = "evict_last" if EVICT else ""
    STREAM: tl.constexpr = "evict_first" if EVICT else ""
    row, x_row, label, valid, lse = row_logprob(
        x_ptr, stride_b, stride_t, labels_ptr, lp_ptr, lse_ptr, T, V, ignore_index, BLOCK_V, ACC, KEEP
    )
    coef = tl.where(valid, tl.load(coef_ptr + row).to(ACC), 0.0)
    grad_sweep(x_row, grad_ptr + row * V, V, valid & (coef != 0.0), lse, label, coef, BLOCK_V, ACC, STREAM)


# ---------------------------------------------------------------------------------------------
# Launchers: the ``triton`` entries of the backend registry (nlft_kernels/backends.py).


def _device_of(t: torch.Tensor):
    """The device guard of a launch on ``t``: Triton launches on the current CUDA device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _unversioned(t: torch.Tensor) -> torch.Tensor:
    """``t``'s memory under a version counter of its own: Triton's interpreter copies every
    tensor argument back after a launch, which would count as writing tensors that autograd
    saved (the kernels read them only). A GPU launch touches no version counter."""
    return t.data


def _row_strides(view: torch.Tensor) -> tuple[int, int]:
    return (view.stride(0), view.stride(1)) if view.dim() == 3 else (0, 0)


def row_pass(v: Views, cfg: NLFTConfig, compute_grad: bool, out: torch.Tensor | None = None):
    """The row pass (see ``stages.first_stage``): (stats [3, N], saliency [N] bool, gradient or
    None); the gradient goes into ``out`` when given (contiguous, shaped like the base logits:
    the kernel writes row ``r`` at ``r * V``), which may be ``v.base`` itself (``inplace_grad``,
    the linear loss's chunks: each program reads a tile of its row before it writes it)."""
    base = v.base
    n, vocab = v.labels.numel(), base.shape[-1]
    stats, grad = row_pass_buffers(base, n, compute_grad and out is None)
    if compute_grad and out is not None:
        grad = out
    saliency = torch.empty(n, dtype=torch.int8, device=base.device)
    std, judge = v.standard, v.judge if v.judge is not None else v.standard
    launch = launch_config("row_pass", vocab, v.streams, base.dtype)
    with _device_of(base):
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
            EVICT=launch.evict,
            num_warps=launch.num_warps,
        )
    return stats, saliency.bool(), grad


def scale_rows(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """grad[r] *= factor[r] for every row of ``grad`` [R, V] (contiguous), in place; rows whose
    factor is 1 are neither read nor written, rows whose factor is 0 written without a read."""
    factor = factor.to(acc_dtype(grad.dtype)).contiguous()
    launch = launch_config("scale_rows", grad.shape[1], 1, grad.dtype)
    with _device_of(grad):
        _scale_rows_kernel[(grad.shape[0],)](_unversioned(grad), factor, grad.shape[1], BLOCK_V=launch.block_v,
                                             num_warps=launch.num_warps)  # fmt: skip


def _launch_label_kernel(kernel, x: torch.Tensor, labels: torch.Tensor, buffers, ignore_index: int) -> None:
    launch = launch_config("token_logprobs", x.shape[-1], 1, x.dtype)
    with _device_of(x):
        kernel[(labels.numel(),)](
            _unversioned(x),
            x.stride(0),
            x.stride(1),
            labels,
            *buffers,
            x.shape[1],
            x.shape[2],
            ignore_index,
            BLOCK_V=launch.block_v,
            ACC=tl_acc(x.dtype),
            EVICT=launch.evict,
            num_warps=launch.num_warps,
        )


def label_logprobs(x: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label) [N], lse [N]) in ACC of ``x`` [B, T, V] and contiguous ``labels`` [N]."""
    lp = torch.empty(labels.numel(), dtype=acc_dtype(x.dtype), device=x.device)
    lse = torch.empty_like(lp)
    _launch_label_kernel(_token_logprobs_kernel, x, labels, (lp, lse), ignore_index)
    return lp, lse


def label_logprobs_grad(x, labels, coef, ignore_index: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label) [N], lse [N]) of ``x`` [B, T, V] and, in the same pass, ``out`` (contiguous;
    may be ``x`` itself) = ``coef * (softmax(x) - onehot(label))`` per row."""
    lp = torch.empty(labels.numel(), dtype=acc_dtype(x.dtype), device=x.device)
    lse = torch.empty_like(lp)
    coef = coef.to(lp.dtype).contiguous()
    _launch_label_kernel(_token_logprobs_grad_kernel, x, labels, (coef, lp, lse, out), ignore_index)
    return lp, lse


def softmax_grad(x, labels, lse, coef, ignore_index: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` [B, T, V] (contiguous; may be ``x`` itself) = ``coef * (softmax(x) - onehot(label))``
    per row from the saved ``lse`` [N]; ignored rows get zeros."""
    g = (-coef).to(lse.dtype).contiguous()  # the kernel writes g * (onehot - softmax)
    _launch_label_kernel(_token_logprobs_bwd_kernel, x, labels, (lse, g, out), ignore_index)
    return out
