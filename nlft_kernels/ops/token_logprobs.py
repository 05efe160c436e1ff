"""Label log-probabilities of logits rows, fused: one streaming pass, no [N, V] temporary.

Also holds the two Triton building blocks shared with the NLFT kernel: the online
log-sum-exp update of one vocabulary tile, and the softmax-minus-one-hot gradient of a tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlft_kernels.backends import resolve_backend
from nlft_kernels.ops._common import as_3d, check_labels, check_logits, chunk_rows, row_chunks
from nlft_kernels.ops.launch import launch_config

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
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_ptr + base + cols, mask=cols < limit, other=float("-inf")).to(ACC)
        m, s = lse_update(x, m, s)
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


def safe_labels(labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels with those outside [0, V) replaced by 0, which are inside): the torch paths'
    version of the kernels' mask, whose rows then get NaN log-probs (``validate=False``)."""
    in_range = (labels >= 0) & (labels < vocab)
    return torch.where(in_range, labels, 0), in_range


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _forward_triton(x: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = labels.numel()
    lp = torch.empty(n, dtype=acc_dtype(x.dtype), device=x.device)
    lse = torch.empty_like(lp)
    launch = launch_config("token_logprobs", x.shape[-1], 1, x.dtype)
    _token_logprobs_kernel[(n,)](
        x,
        x.stride(0),
        x.stride(1),
        labels,
        lp,
        lse,
        x.shape[1],
        x.shape[2],
        ignore_index,
        BLOCK_V=launch.block_v,
        ACC=tl_acc(x.dtype),
        num_warps=launch.num_warps,
    )
    return lp, lse


def _forward_torch(x: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat_labels = labels.reshape(-1)
    lp = torch.zeros(flat_labels.numel(), dtype=acc_dtype(x.dtype), device=x.device)
    lse = torch.zeros_like(lp)
    for start, rows in row_chunks(x, chunk_rows(x.shape[-1])):
        lab = flat_labels[start : start + rows.shape[0]]
        valid = lab != ignore_index
        xs = rows.to(lp.dtype)
        chunk_lse = torch.logsumexp(xs, dim=-1)
        safe, in_range = safe_labels(lab, x.shape[-1])
        picked = torch.where(in_range, xs.gather(1, safe.unsqueeze(1)).squeeze(1), float("nan"))
        lp[start : start + rows.shape[0]] = torch.where(valid, picked - chunk_lse, 0.0)
        lse[start : start + rows.shape[0]] = torch.where(valid, chunk_lse, 0.0)
    return lp, lse


def _forward_cpp(x: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ kernel of nlft_kernels._C (CPU tensors): one vectorised sweep per labelled row."""
    from nlft_kernels.backends import compiled

    return compiled().label_logprobs(x, labels, ignore_index)


def _backward_triton(x, labels, lse, g, ignore_index):
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    launch = launch_config("token_logprobs", x.shape[-1], 1, x.dtype)
    _token_logprobs_bwd_kernel[(labels.numel(),)](
        x,
        x.stride(0),
        x.stride(1),
        labels,
        lse,
        g.contiguous(),
        grad,
        x.shape[1],
        x.shape[2],
        ignore_index,
        BLOCK_V=launch.block_v,
        ACC=tl_acc(x.dtype),
        num_warps=launch.num_warps,
    )
    return grad


def _backward_torch(x, labels, lse, g, ignore_index):
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device).view(-1, x.shape[-1])
    flat_labels = labels.reshape(-1)
    for start, rows in row_chunks(x, chunk_rows(x.shape[-1])):
        stop = start + rows.shape[0]
        lab = flat_labels[start:stop]
        valid = lab != ignore_index
        coef = torch.where(valid, -g[start:stop].to(lse.dtype), 0.0)
        chunk = torch.exp(rows.to(lse.dtype) - lse[start:stop, None])
        hit = valid & safe_labels(lab, x.shape[-1])[1]  # no one-hot for a label outside [0, V)
        chunk[hit, lab[hit]] -= 1.0
        grad[start:stop] = chunk * coef[:, None]
    return grad.view(x.shape)


class TokenLogprobsFunction(torch.autograd.Function):
    """log p(label) per row with the fused kernels; backward recomputes the softmax from lse."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, backend: str):
        x = as_3d(logits, "logits")
        flat_labels = labels.reshape(-1).contiguous()
        # The CUDA extension has no log-prob kernel: CUDA tensors forced to "cuda" take torch.
        forward = {"triton": _forward_triton, "cpp": _forward_cpp}.get(backend, _forward_torch)
        lp, lse = forward(x, flat_labels, ignore_index)
        ctx.save_for_backward(x, flat_labels, lse)
        ctx.ignore_index, ctx.backend, ctx.logits_shape = ignore_index, backend, logits.shape
        return lp.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_lp: torch.Tensor):
        x, labels, lse = ctx.saved_tensors
        backward = _backward_triton if ctx.backend == "triton" else _backward_torch
        grad = backward(x, labels, lse, grad_lp.reshape(-1), ctx.ignore_index)
        return grad.view(ctx.logits_shape), None, None, None


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, backend: str = "auto", validate: bool = True
) -> torch.Tensor:
    """log p(label) for each row: ``logits`` [B, T, V] or [N, V] (fp32/bf16/fp16/fp64), ``labels``
    [B, T] or [N] int64 -> float32 (float64 for float64 logits) shaped like ``labels``, 0 at
    ``ignore_index``. Differentiable in ``logits``; never builds a [N, V] temporary in forward.

    ``validate`` checks label range and finiteness (one host sync); turn it off in hot loops.
    It is off while ``torch.compile`` traces the call (see ``nlft_kernels.ops.custom_ops``).
    """
    check_logits(logits, "logits")
    if torch.compiler.is_compiling():
        from nlft_kernels.ops.custom_ops import token_logprobs_apply

        labels = check_labels(labels, logits, ignore_index, validate=False)
        return token_logprobs_apply(logits, labels, ignore_index, backend)
    labels = check_labels(labels, logits, ignore_index, validate)
    lp = TokenLogprobsFunction.apply(logits, labels, ignore_index, resolve_backend(backend, logits.device))
    if validate and not bool(torch.isfinite(lp).all()):
        raise ValueError("logits contains non-finite values (NaN or +inf, or -inf at a label) in a labelled row")
    return lp
