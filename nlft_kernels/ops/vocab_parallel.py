"""The NLFT loss over a vocabulary split across the ranks of a process group (tensor parallelism).

Megatron's layout: with P ranks and a vocabulary of V = P * Vp entries (Megatron pads V to a
multiple of P), rank r holds the columns [r * Vp, (r + 1) * Vp) of every view's logits, and of
the LM head's rows ([Vp, D] of the [V, D] head, and [Vp] of its bias). Labels are global ids,
the same on every rank, as are the hidden states that feed the head.

Per row, each view needs three numbers from the whole vocabulary: the max, the sum of
exponentials and the label's logit. Each rank computes them over its columns; one MAX
all-reduce of the maxima [3, N] and one SUM all-reduce of the sums (rescaled to the global
max) with the label logits [6, N] (the label logit is 0 on every rank but the one that holds
it) give every rank the same three label log-probs per row. From there the rule is row-local
and the per-sample stage works on [N]-sized tensors, so every rank decides the same saliency,
weights and loss; the gradient of each rank's columns, ``coef * (softmax - onehot)``, needs
nothing from the other ranks. The linear form multiplies the hidden states by the local rows
of the head; its hidden-state gradient is a sum over the vocabulary, so it is all-reduced
(SUM) in backward, as Megatron's column-parallel linear does.

This path runs in PyTorch ops on whole [N, Vp] shards (float32 for 16-bit inputs), not
chunked: per rank, a [N, V / P] logits shard and its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.contracts import ViewMode, acc_dtype
from nlft_kernels.ops.inputs import DETAIL_FIELDS, Views, check_logits, nlft_outputs, prepare_nlft_inputs
from nlft_kernels.ops.row_rule import row_saliency, row_terms
from nlft_kernels.ops.stages import second_stage


def shard_range(vocab_shard: int, group) -> tuple[int, int]:
    """[start, stop) of this rank's columns in the global vocabulary (Megatron's layout)."""
    rank = dist.get_rank(group)
    return rank * vocab_shard, (rank + 1) * vocab_shard


def global_vocab(vocab_shard: int, group) -> int:
    return vocab_shard * dist.get_world_size(group)


def _local_labels(labels: torch.Tensor, start: int, vocab_shard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels shifted into this shard, clamped to it; whether the label is in this shard)."""
    local = labels - start
    here = (local >= 0) & (local < vocab_shard)
    return torch.where(here, local, 0), here


def label_logprobs(views: list[torch.Tensor], labels: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label) [k, N], lse [k, N]) over the global vocabulary of k views given as local
    shards [N, Vp] (in the accumulator dtype); two all-reduces for all k views together."""
    vocab_shard = views[0].shape[-1]
    start, _ = shard_range(vocab_shard, group)
    local, here = _local_labels(labels, start, vocab_shard)
    maxima = torch.stack([v.max(-1).values for v in views])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([torch.exp(v - m[:, None]).sum(-1) for v, m in zip(views, maxima, strict=True)])
    picked = torch.stack([torch.where(here, v.gather(1, local[:, None]).squeeze(1), 0.0) for v in views])
    both = torch.cat([sums, picked])
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    sums, picked = both[: len(views)], both[len(views) :]
    lse = maxima + sums.log()
    return picked - lse, lse


def _provisional_grad(x, lse, labels, coef, start):
    """coef * (softmax - onehot) of this rank's columns ``x`` [N, Vp] (rows' global ``lse``)."""
    local, here = _local_labels(labels, start, x.shape[-1])
    grad = torch.exp(x - lse[:, None])
    rows = torch.arange(x.shape[0], device=x.device)
    grad[rows[here], local[here]] -= 1.0
    return grad * coef[:, None]


def forward_rows(base, views: Views, teachers, sample_ids, correct, hidden, cfg: NLFTConfig, reduction, group, grad):
    """The loss, the details and (with ``grad``) the gradient of ``base`` [N, Vp] (ACC) of one
    call. ``teachers``: the standard and judge shards [N, Vp] in ACC (None where given as
    log-probs in ``views``)."""
    labels = views.labels
    valid = labels != cfg.ignore_index
    safe = torch.where(valid, labels, 0)
    shards = [base] + [t for t in teachers if t is not None]
    lps, lses = label_logprobs(shards, safe, group)
    lp_b, lse_b = lps[0], lses[0]
    rest = iter(lps[1:])
    lp_s = next(rest) if teachers[0] is not None else views.standard
    lp_j = next(rest) if teachers[1] is not None else views.judge
    if lp_j is None:
        lp_j = torch.zeros_like(lp_b)
    wrong = views.wrong
    lp_b, lp_s = torch.where(valid, lp_b, 0.0), torch.where(valid, lp_s, 0.0)
    lp_j = torch.where(wrong & valid, lp_j, 0.0)
    saliency = row_saliency(lp_b, lp_s, lp_j, wrong, valid, cfg)
    stats = torch.stack([lp_b, lp_s, lp_j])
    stage = second_stage(stats, saliency, views, sample_ids, correct, hidden, cfg, reduction, False)
    grad_rows = None
    if grad:
        _, _, coef = row_terms(lp_b, lp_s, lp_j, wrong, saliency, torch.zeros_like(valid), cfg)
        coef = torch.where(valid, coef * views.scale * stage.factor, 0.0)
        start, _ = shard_range(base.shape[-1], group)
        grad_rows = _provisional_grad(base, lse_b, safe, coef, start)
    return stage, grad_rows


@dataclass
class VocabParallelParams:
    """Everything of one call but the base shard: as for ``forward_rows``; ``grad_on``: the
    caller's grad mode."""

    views: Views
    teachers: list[torch.Tensor | None]
    sample_ids: torch.Tensor
    correct: torch.Tensor
    hidden: torch.Tensor | None
    cfg: NLFTConfig
    reduction: str
    group: object
    grad_on: bool


class VocabParallelNLFTFunction(torch.autograd.Function):
    """The NLFT loss of vocabulary-sharded base logits; the gradient is computed in forward and
    scaled in backward."""

    @staticmethod
    def forward(ctx, base, p: VocabParallelParams):
        flat = base.reshape(-1, base.shape[-1])
        acc = acc_dtype(base.dtype)
        teachers = [None if t is None else t.reshape(flat.shape).to(acc) for t in p.teachers]
        want = p.grad_on and ctx.needs_input_grad[0]
        stage, grad = forward_rows(
            flat.to(acc), p.views, teachers, p.sample_ids, p.correct, p.hidden, p.cfg, p.reduction, p.group, want
        )
        ctx.reduction, ctx.shape, ctx.dtype = p.reduction, base.shape, base.dtype
        ctx.save_for_backward(grad)
        details = tuple(stage.per_row[name] for name in DETAIL_FIELDS)
        ctx.mark_non_differentiable(*details)
        return (stage.loss, *details)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None
        scale = grad_loss.reshape(-1, 1) if ctx.reduction == "none" else grad_loss
        return (grad * scale).to(ctx.dtype).view(ctx.shape), None


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward all-reduces (SUM) the gradient over ``group``: the hidden
    states feed every rank's shard of the head (Megatron's copy-to-tensor-parallel region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def linear_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group, wide: bool = False
) -> torch.Tensor:
    """This rank's logits shard [..., Vp] of ``hidden`` [..., D] under the head's local rows
    ``weight`` [Vp, D]: in the input dtype (``F.linear``'s, as the chunks of
    ``nlft_linear_loss``), or with ``wide`` in ACC (the teachers' log-probs, as
    ``linear_token_logprobs``); the gradient of ``hidden`` is all-reduced over ``group`` in backward."""
    hidden = _AllReduceGrad.apply(hidden, group) if torch.is_grad_enabled() and hidden.requires_grad else hidden
    if not wide:
        return torch.nn.functional.linear(hidden, weight, bias)
    acc = acc_dtype(weight.dtype)
    logits = hidden.to(acc) @ weight.to(acc).t()
    return logits if bias is None else logits + bias.to(acc)


def nlft_loss_vocab_parallel(
    base_logits, labels, correct, standard, judge, config, reduction, sample_ids, hidden_states, return_details,
    validate, group,
):  # fmt: skip
    """``nlft_loss`` with ``vocab_parallel_group=group``: every [.., V] argument is this rank's
    shard [.., V / P]; labels and [B, T] teacher log-probs are global."""
    check_logits(base_logits, "base_logits")  # before its shape is read
    vocab = global_vocab(base_logits.shape[-1], group)
    inputs = prepare_nlft_inputs(
        base_logits, labels, correct, standard, judge, config, reduction, sample_ids, validate, vocab=vocab
    )
    views = inputs.views
    # Teachers given as logits are shards: they go to the Function beside the views, which
    # keep the [N] log-probs only.
    teachers = [
        view if mode == ViewMode.LOGITS else None
        for view, mode in ((views.standard, views.standard_mode), (views.judge, views.judge_mode))
    ]
    if teachers[0] is not None:
        views.standard = None
    if teachers[1] is not None:
        views.judge = None
    hidden = None
    if hidden_states is not None and config.cluster_criterion != "off":
        hidden = hidden_states.detach().reshape(views.labels.numel(), -1)
    params = VocabParallelParams(
        views, teachers, inputs.sample_ids, inputs.correct, hidden, config, reduction, group, torch.is_grad_enabled()
    )
    loss, *details = VocabParallelNLFTFunction.apply(base_logits, params)
    return nlft_outputs(loss, details, inputs.shape, reduction, return_details)


def linear_token_logprobs_vocab_parallel(hidden, weight, labels, bias, ignore_index: int, group) -> torch.Tensor:
    """``linear_token_logprobs`` with the head's rows split over ``group`` (no gradient)."""
    with torch.no_grad():
        logits = linear_logits(hidden.reshape(-1, hidden.shape[-1]), weight, bias, group, wide=True)
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        lp, _ = label_logprobs([logits], torch.where(valid, flat, 0), group)
        return torch.where(valid, lp[0], 0.0).view(labels.shape)
