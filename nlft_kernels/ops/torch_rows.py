"""The backend ``torch``: the kernels' contracts in chunked PyTorch ops (any device).

Each function has the signature of its Triton launcher in ``ops/kernels.py``; rows are taken
a chunk at a time (``chunk_rows``) so that no [N, V] float32 temporary exists.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.contracts import ViewMode, acc_dtype
from nlft_kernels.ops.inputs import Views, flat_rows
from nlft_kernels.ops.launch import row_pass_buffers
from nlft_kernels.ops.row_rule import row_saliency, row_terms, safe_labels


def chunk_rows(vocab: int, target_bytes: int = 64 << 20) -> int:
    """Rows per chunk of the torch path: a few float32 [rows, V] temporaries of ``target_bytes``."""
    return max(1, target_bytes // (4 * vocab))


def row_chunks(x: torch.Tensor, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, [r, V] rows) of a [B, T, V] tensor, ``rows`` at a time, without copying."""
    batch, steps, vocab = x.shape
    try:
        flat = x.view(batch * steps, vocab)
    except RuntimeError:
        flat = None
    if flat is not None:
        for start in range(0, batch * steps, rows):
            yield start, flat[start : start + rows]
        return
    for b in range(batch):
        for start in range(0, steps, rows):
            yield b * steps + start, x[b, start : start + rows]


def _label_logprob(rows: torch.Tensor, labels: torch.Tensor, in_range: torch.Tensor, lse: torch.Tensor | None = None):
    """x[label] - lse(x) of rows [r, V] in ACC; NaN where the label is outside [0, V)."""
    picked = torch.where(in_range, rows.gather(1, labels[:, None]).squeeze(1), float("nan"))
    return picked - (torch.logsumexp(rows, dim=-1) if lse is None else lse)


def row_pass(v: Views, cfg: NLFTConfig, compute_grad: bool, inplace_grad: bool = False):
    """The row pass (see ``stages.first_stage``) with the rule of ``ops/row_rule.py``;
    ``inplace_grad``: the gradient is written over the contiguous base logits, chunk by chunk
    once each chunk's statistics are taken, and ``v.base`` is returned as the gradient."""
    base = v.base
    n, vocab = v.labels.numel(), base.shape[-1]
    acc = acc_dtype(base.dtype)
    stats, grad = row_pass_buffers(base, n, compute_grad and not inplace_grad)
    if compute_grad and inplace_grad:
        assert base.is_contiguous(), "an in-place gradient needs contiguous base logits"
        grad = base
    saliency = torch.empty(n, dtype=torch.bool, device=base.device)
    grad_rows = grad.view(-1, vocab) if compute_grad else None

    def teacher(view, mode, start, stop, labels, in_range):
        if mode == ViewMode.LOGPROBS:
            return view[start:stop]
        if mode == ViewMode.NONE:
            return torch.zeros(stop - start, dtype=acc, device=base.device)
        return _label_logprob(flat_rows(view, start, stop).to(acc), labels, in_range)

    for start, rows in row_chunks(base, chunk_rows(vocab)):
        stop = start + rows.shape[0]
        labels = v.labels[start:stop]
        valid = labels != cfg.ignore_index
        safe, in_range = safe_labels(labels, vocab)
        x = rows.to(acc)
        lse = torch.logsumexp(x, dim=-1)
        lp_b = _label_logprob(x, safe, in_range, lse)
        lp_s = teacher(v.standard, v.standard_mode, start, stop, safe, in_range)
        lp_j = teacher(v.judge, v.judge_mode, start, stop, safe, in_range)
        wrong = v.wrong[start:stop]
        lp_j = torch.where(wrong & valid, lp_j, 0.0)
        lp_b, lp_s = torch.where(valid, lp_b, 0.0), torch.where(valid, lp_s, 0.0)
        chunk_saliency = row_saliency(lp_b, lp_s, lp_j, wrong, valid & in_range, cfg)
        stats[:, start:stop] = torch.stack([lp_b, lp_s, lp_j])
        saliency[start:stop] = chunk_saliency
        if compute_grad:
            _, _, coef = row_terms(lp_b, lp_s, lp_j, wrong, chunk_saliency, torch.zeros_like(valid), cfg)
            coef = torch.where(valid, coef * v.scale[start:stop], 0.0)
            coef = torch.where(valid & ~in_range, float("nan"), coef)  # as the kernels
            # Out of place: for float32 inputs ``x`` is the caller's tensor itself.
            probs = torch.exp(x - lse[:, None])
            hit = valid & in_range
            probs[hit, safe[hit]] -= 1.0
            grad_rows[start:stop] = probs.mul_(coef[:, None])
    return stats, saliency, grad


def scale_rows(grad: torch.Tensor, factor: torch.Tensor, rows: torch.Tensor) -> None:
    """grad[r] *= factor[r] for the rows ``rows`` of ``grad`` [..., V], in place."""
    flat = grad.view(-1, grad.shape[-1])
    flat.index_copy_(0, rows, flat.index_select(0, rows) * factor[rows, None].to(flat.dtype))


def label_logprobs(x: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label) [N], lse [N]) in ACC of ``x`` [B, T, V] and ``labels`` [N]."""
    flat_labels = labels.reshape(-1)
    lp = torch.zeros(flat_labels.numel(), dtype=acc_dtype(x.dtype), device=x.device)
    lse = torch.zeros_like(lp)
    for start, rows in row_chunks(x, chunk_rows(x.shape[-1])):
        stop = start + rows.shape[0]
        lab = flat_labels[start:stop]
        valid = lab != ignore_index
        xs = rows.to(lp.dtype)
        chunk_lse = torch.logsumexp(xs, dim=-1)
        safe, in_range = safe_labels(lab, x.shape[-1])
        lp[start:stop] = torch.where(valid, _label_logprob(xs, safe, in_range, chunk_lse), 0.0)
        lse[start:stop] = torch.where(valid, chunk_lse, 0.0)
    return lp, lse


def label_logprobs_backward(x, labels, lse, g, ignore_index: int) -> torch.Tensor:
    """The gradient [B, T, V] of ``x`` for the upstream gradient ``g`` [N] of the log-probs."""
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
