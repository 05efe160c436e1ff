"""The fused NLFT loss: one streaming pass per row over the base, standard and judge logits.

Every token's loss has a gradient of the same form in the base logits,
``coef * (softmax(x_b) - onehot(y))``, with ``coef = w + nll_weight`` (correct response),
``w`` (wrong response, ordinary token) or ``-w * p_b / (1 - p_b)`` (unlikelihood), times a
row scale that holds ``loss_scale`` and the reduction's normalisation (``1 / n`` of the
sample). So one program per row computes the three log-softmax statistics online, decides
saliency and the weight, and writes the gradient row in a second sweep of the same launch.

Two parts of the rule are not row-local: the 6% rule (a wrong sample whose saliency share is
above ``saliency_fraction`` zeroes its ordinary tokens) and saliency clusters. A small second
stage on [N]-sized statistics decides them and rescales only the gradient rows they change;
in the common case it touches none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nlft_kernels.backends import resolve_backend
from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops._common import as_3d, check_labels, check_logits, chunk_rows, row_chunks
from nlft_kernels.ops.launch import grad_dtype, launch_config
from nlft_kernels.ops.saliency_clusters import saliency_clusters
from nlft_kernels.ops.token_logprobs import LSE_START, acc_dtype, lse_update, safe_labels, softmax_grad_tile, tl_acc

REDUCTIONS = ("sample_mean", "token_mean", "sum", "none")

# How a teacher view reaches the kernel.
VIEW_NONE, VIEW_LOGITS, VIEW_LOGPROBS = 0, 1, 2


@triton.jit
def _view_logprob(ptr, offset, m, s, label, use, in_range, ACC: tl.constexpr):
    """log p(label) of a streamed view from its running (max, sum); 0 where ``use`` is false,
    NaN where the label is outside [0, V) (nothing outside the row is read)."""
    x_label = tl.load(ptr + offset + label, mask=use & in_range, other=float("nan")).to(ACC)
    return tl.where(use, x_label - m - tl.log(tl.where(use, s, 1.0)), 0.0)


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
        x_b = tl.load(base_ptr + base_off + cols, mask=cols < limit, other=float("-inf")).to(ACC)
        m_b, s_b = lse_update(x_b, m_b, s_b)
        if STD == 1:
            x_s = tl.load(std_ptr + std_off + cols, mask=cols < limit, other=float("-inf")).to(ACC)
            m_s, s_s = lse_update(x_s, m_s, s_s)
        if JUDGE == 1:
            x_j = tl.load(judge_ptr + judge_off + cols, mask=cols < limit_judge, other=float("-inf")).to(ACC)
            m_j, s_j = lse_update(x_j, m_j, s_j)

    lse_b = tl.where(valid, m_b + tl.log(tl.where(valid, s_b, 1.0)), 0.0)
    x_label = tl.load(base_ptr + base_off + label, mask=valid & in_range, other=float("nan")).to(ACC)
    lp_b = tl.where(valid, x_label - lse_b, 0.0)
    if STD == 1:
        lp_s = _view_logprob(std_ptr, std_off, m_s, s_s, label, valid, in_range, ACC)
    else:
        lp_s = tl.where(valid, tl.load(std_ptr + row, mask=valid, other=0.0).to(ACC), 0.0)
    if JUDGE == 1:
        lp_j = _view_logprob(judge_ptr, judge_off, m_j, s_j, label, use_judge, in_range, ACC)
    elif JUDGE == 2:
        lp_j = tl.where(use_judge, tl.load(judge_ptr + row, mask=use_judge, other=0.0).to(ACC), 0.0)
    else:
        lp_j = tl.zeros([], ACC)

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


@dataclass
class NLFTDetails:
    """Per-token details of one NLFT loss evaluation, each shaped like ``labels``.

    logprob_*: log p(label) of each view (float32; judge 0 on rows of correct samples);
    weight: the token weight w; saliency: saliency tokens; unlikelihood: the saliency tokens of
    wrong samples (trained by unlikelihood); cluster: cluster neighbours; killed: ordinary
    tokens of wrong samples zeroed by the saliency-fraction rule; token_loss: per-token loss
    (``loss_scale * (token_loss + nll_weight * NLL)``, 0 at padding).
    """

    logprob_base: torch.Tensor
    logprob_standard: torch.Tensor
    logprob_judge: torch.Tensor
    weight: torch.Tensor
    saliency: torch.Tensor
    unlikelihood: torch.Tensor
    cluster: torch.Tensor
    killed: torch.Tensor
    token_loss: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Row terms in PyTorch: the chunked path's per-row rule and the second stage of every path.


def row_saliency(lp_b, lp_s, lp_j, wrong, valid, cfg: NLFTConfig) -> torch.Tensor:
    """Saliency of each row [N] bool from the three label log-probs [N]."""
    log_r1 = lp_j - lp_b
    saliency_wrong = (
        (log_r1 > math.log(cfg.ratio_threshold))
        & (lp_j - lp_s > math.log(cfg.ratio_threshold))
        & (lp_j > _log(cfg.judge_min_prob))
    )
    return torch.where(wrong, saliency_wrong, lp_s.exp() > cfg.correct_threshold) & valid


def row_terms(lp_b, lp_s, lp_j, wrong, saliency, demoted, cfg: NLFTConfig):
    """(weight, loss, coef) per row [N]: ``loss`` is token_loss + nll_weight * NLL (no scale);
    ``coef`` the factor of ``softmax - onehot`` in its gradient. ``demoted`` marks ordinary
    tokens that are cluster neighbours or killed by the saliency-fraction rule.

    ``demoted`` rows of correct samples take the cluster weight (killing applies to wrong ones).
    """
    tau = cfg.correct_threshold
    p_s, p_b = lp_s.exp(), lp_b.exp()
    w_correct = torch.where(
        saliency,
        1 + ((p_s - tau) / (1 - tau)).clamp(min=0) ** cfg.saliency_power,
        torch.where(demoted, (p_s / tau) ** cfg.cluster_power, (p_s / tau) ** cfg.other_power),
    )
    r1 = (lp_j - lp_b).exp()
    w_wrong = torch.where(
        saliency,
        cfg.sigmoid_scale * torch.sigmoid(r1 - cfg.sigmoid_center),
        torch.where(demoted, torch.zeros_like(p_s), p_s.sqrt()),
    )
    weight = torch.where(wrong, w_wrong, w_correct)
    one_minus = 1 - p_b
    unlikely = wrong & saliency
    loss = torch.where(
        unlikely,
        -weight * one_minus.clamp(min=cfg.unlikelihood_clamp).log(),
        -(weight + torch.where(wrong, 0.0, cfg.nll_weight)) * lp_b,
    )
    coef_unlikely = torch.where(
        one_minus >= cfg.unlikelihood_clamp, -weight * p_b / one_minus.clamp(min=cfg.unlikelihood_clamp), 0.0
    )
    coef = torch.where(unlikely, coef_unlikely, weight + torch.where(wrong, 0.0, cfg.nll_weight))
    return weight, loss, coef


def _log(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


def row_scale(valid, sample_ids, n_samples: int, reduction: str, loss_scale: float, dtype) -> torch.Tensor:
    """Per-row factor [N] of the reduced loss: ``loss_scale`` times 1/(n_b * samples with
    tokens) for ``sample_mean``, 1/(all tokens) for ``token_mean``, 1 for ``sum``/``none``."""
    scale = valid.to(dtype) * loss_scale
    if reduction == "token_mean":
        return scale / valid.sum().clamp(min=1)
    if reduction == "sample_mean":
        if torch.compiler.is_compiling():
            # Inductor's CPU code generation fails on this index_add_ (a vectorised atomic
            # scatter, torch 2.13); a one-hot product counts the same (small integers: exact).
            members = sample_ids == torch.arange(n_samples, device=valid.device)[:, None]
            n = members.to(dtype) @ valid.to(dtype)
        else:
            n = torch.zeros(n_samples, dtype=dtype, device=valid.device).index_add_(0, sample_ids, valid.to(dtype))
        return scale / (n[sample_ids].clamp(min=1) * (n > 0).sum().clamp(min=1))
    return scale


# ---------------------------------------------------------------------------------------------
# The first stage: statistics [3, N], saliency [N] and the provisional gradient.


@dataclass
class Views:
    """The normalised rows of one call.

    base: [B, T, V] logits (any row strides); standard/judge: [B, T, V] logits
    (``VIEW_LOGITS``) or [N] log-probs in ACC (``VIEW_LOGPROBS``), judge None with
    ``VIEW_NONE``; labels [N] int64; wrong [N] bool (rows of wrong samples); scale [N] ACC,
    the row's factor in the reduced loss (see ``row_scale``).
    """

    base: torch.Tensor
    standard: torch.Tensor
    standard_mode: int
    judge: torch.Tensor | None
    judge_mode: int
    labels: torch.Tensor
    wrong: torch.Tensor
    scale: torch.Tensor

    @property
    def streams(self) -> int:
        """[V] rows the row pass reads at once: the base, and each teacher given as logits."""
        return 1 + (self.standard_mode == VIEW_LOGITS) + (self.judge_mode == VIEW_LOGITS)

    def rows(self, start: int, stop: int, base: torch.Tensor) -> Views:
        """Rows [start, stop) of every view, with ``base`` [stop - start, V] as their base logits."""

        def cut(view, mode):
            if mode == VIEW_LOGITS:
                return _rows(view, start, stop).unsqueeze(0)
            return view[start:stop] if mode == VIEW_LOGPROBS else None

        return Views(
            base=base.unsqueeze(0),
            standard=cut(self.standard, self.standard_mode),
            standard_mode=self.standard_mode,
            judge=cut(self.judge, self.judge_mode),
            judge_mode=self.judge_mode,
            labels=self.labels[start:stop],
            wrong=self.wrong[start:stop],
            scale=self.scale[start:stop],
        )


def _first_stage_triton(v: Views, cfg: NLFTConfig, compute_grad: bool):
    base = v.base
    n, vocab = v.labels.numel(), base.shape[-1]
    acc = acc_dtype(base.dtype)
    stats = torch.empty(3, n, dtype=acc, device=base.device)
    saliency = torch.empty(n, dtype=torch.int8, device=base.device)
    grad = torch.empty(base.shape, dtype=grad_dtype(base.dtype), device=base.device) if compute_grad else stats
    std, judge = v.standard, v.judge if v.judge is not None else v.standard
    cfg_launch = launch_config("row_pass", vocab, v.streams, base.dtype)
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
        grad,
        n,
        base.shape[1],
        vocab,
        *_rule_constants(cfg),
        STD=v.standard_mode,
        JUDGE=v.judge_mode,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=cfg_launch.block_v,
        ACC=tl_acc(base.dtype),
        num_warps=cfg_launch.num_warps,
    )
    return stats, saliency.bool(), grad if compute_grad else None


def _rule_constants(cfg: NLFTConfig) -> tuple:
    """The config's scalars in the order the row kernels (Triton, C++, CUDA) take them."""
    return (
        cfg.ignore_index,
        cfg.correct_threshold,
        cfg.saliency_power,
        cfg.other_power,
        math.log(cfg.ratio_threshold),
        _log(cfg.judge_min_prob),
        cfg.sigmoid_center,
        cfg.sigmoid_scale,
        cfg.unlikelihood_clamp,
        cfg.nll_weight,
    )


def _first_stage_ext(v: Views, cfg: NLFTConfig, compute_grad: bool):
    """The row pass of the compiled extension (csrc/: the C++ kernel on CPU tensors, the CUDA
    kernel on CUDA ones), with the contract of ``_first_stage_triton``."""
    from nlft_kernels.backends import compiled

    return compiled().first_stage(
        v.base,
        v.standard,
        v.standard_mode,
        v.judge,
        v.judge_mode,
        v.labels,
        v.wrong,
        v.scale,
        *_rule_constants(cfg),
        compute_grad,
    )


def _row_strides(view: torch.Tensor) -> tuple[int, int]:
    return (view.stride(0), view.stride(1)) if view.dim() == 3 else (0, 0)


def _first_stage_torch(v: Views, cfg: NLFTConfig, compute_grad: bool):
    base = v.base
    n, vocab = v.labels.numel(), base.shape[-1]
    acc = acc_dtype(base.dtype)
    stats = torch.zeros(3, n, dtype=acc, device=base.device)
    saliency = torch.zeros(n, dtype=torch.bool, device=base.device)
    grad = torch.empty(base.shape, dtype=grad_dtype(base.dtype), device=base.device) if compute_grad else None
    grad_rows = grad.view(-1, vocab) if compute_grad else None
    rows_per_chunk = chunk_rows(vocab)

    def label_logprob(rows, labels, in_range):
        picked = torch.where(in_range, rows.gather(1, labels[:, None]).squeeze(1), float("nan"))
        return picked - torch.logsumexp(rows, dim=-1)

    def teacher(view, mode, start, stop, labels, in_range):
        if mode == VIEW_LOGPROBS:
            return view[start:stop]
        if mode == VIEW_NONE:
            return torch.zeros(stop - start, dtype=acc, device=base.device)
        return label_logprob(_rows(view, start, stop).to(acc), labels, in_range)

    for start, rows in row_chunks(base, rows_per_chunk):
        stop = start + rows.shape[0]
        labels = v.labels[start:stop]
        valid = labels != cfg.ignore_index
        safe, in_range = safe_labels(labels, vocab)
        x = rows.to(acc)
        lse = torch.logsumexp(x, dim=-1)
        lp_b = label_logprob(x, safe, in_range)
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


def _rows(view: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Flat rows [start, stop) of a [B, T, V] view as [r, V], copying at most those rows."""
    steps = view.shape[1]
    pieces = []
    while start < stop:
        b, t = divmod(start, steps)
        take = min(stop - start, steps - t)
        pieces.append(view[b, t : t + take])
        start += take
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def rescale_rows(grad: torch.Tensor, factor: torch.Tensor, rows: torch.Tensor, backend: str) -> None:
    """grad[r] *= factor[r] for the rows ``rows`` (a few, usually none)."""
    flat = grad.view(-1, grad.shape[-1])
    if backend == "triton":
        full = torch.ones(flat.shape[0], dtype=torch.float32, device=grad.device)
        full[rows] = factor[rows].float()
        launch = launch_config("scale_rows", flat.shape[1], 1, flat.dtype)
        _scale_rows_kernel[(flat.shape[0],)](
            flat, full, flat.shape[1], BLOCK_V=launch.block_v, num_warps=launch.num_warps
        )
        return
    if backend == "cpp" and flat.device.type == "cpu" and flat.is_contiguous():
        from nlft_kernels.backends import compiled

        # In place, one pass over the rows, in the accumulator type (as the Triton kernel).
        compiled().scale_rows(flat, rows, factor)
        return
    flat.index_copy_(0, rows, flat.index_select(0, rows) * factor[rows, None].to(flat.dtype))


# ---------------------------------------------------------------------------------------------
# Forward of all paths, and the autograd Function.


def first_stage(v: Views, cfg: NLFTConfig, backend: str, compute_grad: bool):
    """The row pass: (stats [3, N] ACC log-probs of base/standard/judge, saliency [N] bool,
    provisional gradient of ``v.base`` or None). The gradient rows hold everything but the
    per-sample rule and the clusters, which ``second_stage`` decides."""
    if backend == "triton":
        return _first_stage_triton(v, cfg, compute_grad)
    if backend in ("cpp", "cuda"):
        return _first_stage_ext(v, cfg, compute_grad)
    return _first_stage_torch(v, cfg, compute_grad)


@dataclass
class SecondStage:
    """What the per-sample stage decides from the [N] statistics.

    loss: the reduced loss (per-row [N] for ``"none"``); per_row: the details, by field of
    :class:`NLFTDetails`; rows: [k] int64, the gradient rows to rescale; factor: [N], the
    factor by which each of those rows' provisional gradient is multiplied (0 zeroes it).
    """

    loss: torch.Tensor
    per_row: dict[str, torch.Tensor]
    rows: torch.Tensor
    factor: torch.Tensor


def second_stage(
    stats: torch.Tensor,
    saliency: torch.Tensor,
    v: Views,
    sample_ids: torch.Tensor,
    correct: torch.Tensor,
    hidden_states: torch.Tensor | None,
    cfg: NLFTConfig,
    reduction: str,
    validate: bool,
) -> SecondStage:
    """The per-sample rule (saliency fraction), the clusters, the loss and the gradient fix-up.

    Works on [N]-sized tensors only; ``hidden_states`` [N, D] or None.
    """
    lp_b, lp_s, lp_j = stats
    valid = v.labels != cfg.ignore_index
    if validate:
        _check_finite(lp_b, lp_s, lp_j, valid, v)
    counts = torch.zeros(2, correct.numel(), dtype=torch.float32, device=valid.device)
    counts[0].index_add_(0, sample_ids, valid.float())
    counts[1].index_add_(0, sample_ids, (saliency & v.wrong).float())
    killed_sample = ~correct & (counts[1] > cfg.saliency_fraction * counts[0])
    killed = killed_sample[sample_ids] & valid & ~saliency & v.wrong
    if hidden_states is not None and cfg.cluster_criterion != "off":
        cluster = saliency_clusters(hidden_states.detach(), saliency, valid, sample_ids, cfg)
    else:
        cluster = torch.zeros_like(saliency)
    demoted = cluster | killed
    weight, raw, coef = row_terms(lp_b, lp_s, lp_j, v.wrong, saliency, demoted, cfg)
    raw = torch.where(valid, raw, 0.0)
    loss = cfg.loss_scale * raw if reduction == "none" else (raw * v.scale).sum()

    rows = demoted.nonzero().squeeze(1)
    factor = torch.ones_like(coef)
    if rows.numel():
        _, _, provisional = row_terms(lp_b, lp_s, lp_j, v.wrong, saliency, torch.zeros_like(demoted), cfg)
        factor = torch.where(provisional != 0, coef / torch.where(provisional != 0, provisional, 1.0), 0.0)
    per_row = {
        "logprob_base": lp_b,
        "logprob_standard": lp_s,
        "logprob_judge": lp_j,
        "weight": torch.where(valid, weight, 0.0),
        "saliency": saliency,
        "unlikelihood": saliency & v.wrong,
        "cluster": cluster,
        "killed": killed,
        "token_loss": cfg.loss_scale * raw,
    }
    return SecondStage(loss, per_row, rows, factor)


def _check_finite(lp_b, lp_s, lp_j, valid, v: Views) -> None:
    bad = torch.stack(
        [
            (valid & ~torch.isfinite(lp_b)).any(),
            (valid & ~torch.isfinite(lp_s)).any(),
            (valid & v.wrong & ~torch.isfinite(lp_j)).any(),
        ]
    ).tolist()
    for name, is_bad, mode in zip(
        ("base_logits", "standard", "judge"), bad, (VIEW_LOGITS, v.standard_mode, v.judge_mode), strict=True
    ):
        if is_bad:
            what = "logits" if mode == VIEW_LOGITS else "log-probs"
            raise ValueError(
                f"{name} contains non-finite values ({what}: NaN, +inf, or -inf at a label) in a labelled row"
            )


DETAIL_FIELDS = tuple(NLFTDetails.__dataclass_fields__)


def saved_grads(ctx) -> tuple:
    """The gradients stored by forward; a clear error when a first backward already spent them."""
    if getattr(ctx, "grad_spent", False):
        raise RuntimeError(
            "nlft_loss: backward ran twice through one forward; its gradient is stored once and "
            "scaled in place by the first backward (run the forward again instead of retain_graph=True)"
        )
    return ctx.saved_tensors


def scale_saved_grad(ctx, grad: torch.Tensor, grad_loss: torch.Tensor) -> None:
    """grad *= grad_loss in place (per row for ``reduction="none"``): gradient accumulation and
    loss scaling pass a ``grad_loss`` other than 1, and a product out of place would hold a
    second buffer of the gradient's size ([N, V] here; [V, D] for the linear loss's weight) at
    the peak. The buffer is then spent: a second backward through the same forward
    (``retain_graph=True``) raises (``saved_grads``) instead of scaling twice."""
    if ctx.reduction == "none":
        grad.view(-1, grad.shape[-1]).mul_(grad_loss.reshape(-1, 1))
        ctx.grad_spent = True
    elif not bool(grad_loss == 1):
        grad.mul_(grad_loss)
        ctx.grad_spent = True


class NLFTLossFunction(torch.autograd.Function):
    """The NLFT loss of the base logits; the gradient is computed in forward and stored.

    Returns the loss and the per-row details (non-differentiable, in ``DETAIL_FIELDS`` order).
    backward multiplies the stored gradient by ``grad_output`` (per row for ``"none"``). The
    teacher views (standard, judge) and the hidden states get no gradient.
    """

    @staticmethod
    def forward(
        ctx, base_logits, views, sample_ids, correct, hidden_states, cfg, reduction, backend, validate, grad_on
    ):
        # ``grad_on``: grad mode of the caller (forward itself runs under no_grad, and
        # needs_input_grad ignores an outer torch.no_grad()).
        stats, saliency, grad = first_stage(views, cfg, backend, grad_on and ctx.needs_input_grad[0])
        hidden = None if hidden_states is None else hidden_states.reshape(saliency.numel(), -1)
        stage = second_stage(stats, saliency, views, sample_ids, correct, hidden, cfg, reduction, validate)
        if grad is not None and stage.rows.numel():
            rescale_rows(grad, stage.factor, stage.rows, backend)
        loss, per_row = stage.loss, stage.per_row
        ctx.reduction = reduction
        ctx.logits_shape = base_logits.shape
        ctx.save_for_backward(grad)
        details = tuple(per_row[name] for name in DETAIL_FIELDS)
        ctx.mark_non_differentiable(*details)
        return (loss, *details)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_details):
        (grad,) = saved_grads(ctx)
        if grad is None:
            return (None,) * 10
        scale_saved_grad(ctx, grad, grad_loss)
        return (grad.view(ctx.logits_shape),) + (None,) * 9


def nlft_loss(
    base_logits: torch.Tensor,
    labels: torch.Tensor,
    correct: torch.Tensor,
    *,
    standard: torch.Tensor,
    judge: torch.Tensor | None = None,
    config: NLFTConfig = NLFTConfig(),
    reduction: str = "sample_mean",
    sample_ids: torch.Tensor | None = None,
    hidden_states: torch.Tensor | None = None,
    return_details: bool = False,
    backend: str = "auto",
    validate: bool = True,
    vocab_parallel_group=None,
):
    """The NLFT loss (see the spec), fused: no [N, V] temporary besides the base gradient.

    base_logits: [B, T, V] (or flat rows [N, V] with ``sample_ids``) float32/bf16/fp16, the
      trained view; ``logits[b, t]`` predicts ``labels[b, t]``.
    labels: [B, T] (or [N]) int64, ``config.ignore_index`` marks padding.
    correct: [B] (or [S] samples) bool, whether each sample's response is correct.
    standard, judge: teacher views, [B, T, V] logits or [B, T] label log-probs (no gradient);
      ``judge`` is required when any sample is wrong.
    sample_ids: [N] int64 sample of each flat row, non-decreasing.
    hidden_states: [B, T, D] (or [N, D]) base-view states, for saliency clusters.
    reduction: ``"sample_mean"`` (the spec: mean over samples with tokens of
      ``loss_scale * sum_t loss_t / n``), ``"token_mean"``, ``"sum"`` or ``"none"`` (per-token
      ``loss_scale * loss_t`` shaped like ``labels``; ``sum`` and ``token_mean`` reduce it).
    return_details: also return an :class:`NLFTDetails` of per-token tensors.
    backend: ``"auto"`` (on the CPU the compiled C++ kernel when ``nlft_kernels._C`` is built,
      else chunked torch; on CUDA Triton or the CUDA kernel, see ``nlft_kernels.backends``),
      ``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"``.
    validate: check label range, finiteness and wrong samples' judge (a few host syncs); off
      while ``torch.compile`` traces the call (see ``nlft_kernels.ops.custom_ops``).
    vocab_parallel_group: a process group over which the vocabulary is split (Megatron's
      layout, see ``nlft_kernels.ops.vocab_parallel``): ``base_logits`` and teacher logits are
      this rank's columns [r * V / P, (r + 1) * V / P); labels stay global ids. PyTorch ops,
      ``backend`` is not used.
    """
    compiling = torch.compiler.is_compiling()
    validate = validate and not compiling
    if not isinstance(config, NLFTConfig):
        raise ValueError(f"config must be an NLFTConfig, got {type(config).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if vocab_parallel_group is not None:
        from nlft_kernels.ops.vocab_parallel import nlft_loss_vocab_parallel

        return nlft_loss_vocab_parallel(
            base_logits, labels, correct, standard, judge, config, reduction, sample_ids, hidden_states,
            return_details, validate, vocab_parallel_group,
        )  # fmt: skip
    check_logits(base_logits, "base_logits")
    labels = check_labels(labels, base_logits, config.ignore_index, validate)
    flat = base_logits.dim() == 2
    sample_ids, correct = _check_samples(base_logits, labels, correct, sample_ids, flat, validate)
    if hidden_states is not None:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.shape[:-1] != labels.shape:
            raise ValueError(
                f"hidden_states must have shape {tuple(labels.shape)} + (D,), "
                f"got {tuple(getattr(hidden_states, 'shape', ()))}"
            )
        if hidden_states.device != base_logits.device:
            raise ValueError(f"hidden_states is on {hidden_states.device} but base_logits is on {base_logits.device}")
    if not compiling:  # the op resolves it while compiling
        backend = resolve_backend(backend, base_logits.device, labels.numel(), base_logits.shape[-1])
    acc = acc_dtype(base_logits.dtype)
    wrong_rows = ~correct[sample_ids]
    standard_t, standard_mode = _teacher(standard, "standard", base_logits, acc, validate)
    if judge is None:
        # Checked even with validate=False (one host sync, only without a judge): the kernels
        # would otherwise train the wrong samples as correct ones, silently. The op checks it
        # at run time while compiling.
        if not compiling and bool(wrong_rows.any()):
            raise ValueError("judge is required when any sample is wrong (correct has False entries)")
        judge_t, judge_mode = None, VIEW_NONE
    else:
        judge_t, judge_mode = _teacher(judge, "judge", base_logits, acc, validate)
    valid = labels.reshape(-1) != config.ignore_index
    views = Views(
        base=as_3d(base_logits, "base_logits"),
        standard=standard_t,
        standard_mode=standard_mode,
        judge=judge_t,
        judge_mode=judge_mode,
        labels=labels.reshape(-1).contiguous(),
        wrong=wrong_rows & valid if judge is not None else torch.zeros_like(valid),
        scale=row_scale(valid, sample_ids, correct.numel(), reduction, config.loss_scale, acc),
    )
    if compiling:
        from nlft_kernels.ops.custom_ops import nlft_loss_apply as apply
    else:
        apply = NLFTLossFunction.apply
    loss, *details = apply(
        base_logits,
        views,
        sample_ids,
        correct,
        hidden_states,
        config,
        reduction,
        backend,
        validate,
        torch.is_grad_enabled(),
    )
    if reduction == "none":
        loss = loss.view(labels.shape)
    if not return_details:
        return loss
    return loss, NLFTDetails(*(d.view(labels.shape) for d in details))


def _check_samples(base_logits, labels, correct, sample_ids, flat: bool, validate: bool):
    """([N] int64 sample of each row, [S] bool correctness) from the caller's form."""
    if not isinstance(correct, torch.Tensor):
        raise ValueError(f"correct must be a torch.Tensor of bools, got {type(correct).__name__}")
    if correct.dim() != 1 or correct.dtype.is_floating_point:
        raise ValueError(f"correct must be a 1-D bool tensor, got shape {tuple(correct.shape)} {correct.dtype}")
    if correct.device != base_logits.device:
        raise ValueError(f"correct is on {correct.device} but base_logits is on {base_logits.device}")
    correct = correct.bool()
    if not flat:
        if sample_ids is not None:
            raise ValueError("sample_ids is only for flat rows: base_logits [N, V], labels [N]")
        batch, steps = labels.shape
        if correct.numel() != batch:
            raise ValueError(f"correct must have shape ({batch},), one entry per sample, got {tuple(correct.shape)}")
        return torch.arange(batch, device=labels.device).repeat_interleave(steps), correct
    if sample_ids is None:
        raise ValueError("sample_ids [N] is required with flat rows (base_logits [N, V])")
    if not isinstance(sample_ids, torch.Tensor) or sample_ids.shape != labels.shape:
        got = tuple(getattr(sample_ids, "shape", ()))
        raise ValueError(f"sample_ids must have shape {tuple(labels.shape)}, got {got}")
    if sample_ids.dtype.is_floating_point or sample_ids.dtype == torch.bool:
        raise ValueError(f"sample_ids must be an integer tensor, got {sample_ids.dtype}")
    if sample_ids.device != base_logits.device:
        raise ValueError(f"sample_ids is on {sample_ids.device} but base_logits is on {base_logits.device}")
    sample_ids = sample_ids.long()
    if validate:
        if bool(((sample_ids < 0) | (sample_ids >= correct.numel())).any()):
            raise ValueError(f"sample_ids must be in [0, {correct.numel()}), one entry of correct per sample")
        if bool((sample_ids[1:] < sample_ids[:-1]).any()):
            raise ValueError("sample_ids must be non-decreasing: the rows of one sample are contiguous")
    return sample_ids, correct


def _teacher(view, name: str, base_logits: torch.Tensor, acc: torch.dtype, validate: bool = False):
    """A teacher view as ([B, T, V] logits, VIEW_LOGITS) or ([N] log-probs in ACC, VIEW_LOGPROBS).

    ``validate``: log-probs above 0 (a probability above 1: logits passed as [B, T], or a sign
    flipped) are refused, beyond the rounding of their dtype (one host sync)."""
    if not isinstance(view, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (logits or label log-probs), got {type(view).__name__}")
    if view.device != base_logits.device:
        raise ValueError(f"{name} is on {view.device} but base_logits is on {base_logits.device}")
    if not view.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float tensor, got {view.dtype}")
    view = view.detach()
    if view.shape == base_logits.shape:
        return as_3d(view, name), VIEW_LOGITS
    if view.shape == base_logits.shape[:-1]:
        if validate and bool((view > 8 * torch.finfo(view.dtype).eps).any()):
            worst = float(view.max())
            raise ValueError(
                f"{name} given as [B, T] label log-probs must be <= 0 (log of a probability), found {worst:.4g}: "
                f"pass log-probs (e.g. log_softmax(logits).gather(...)), or the [B, T, V] logits"
            )
        return view.reshape(-1).to(acc).contiguous(), VIEW_LOGPROBS
    raise ValueError(
        f"{name} must be logits of shape {tuple(base_logits.shape)} or label log-probs of shape "
        f"{tuple(base_logits.shape[:-1])}, got {tuple(view.shape)}"
    )
