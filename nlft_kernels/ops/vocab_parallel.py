"""The NLFT loss over a vocabulary split across the ranks of a process group (tensor parallelism).

Megatron's layout: with P ranks and a vocabulary of V = P * Vp entries (Megatron pads V to a
multiple of P), rank r holds the columns [r * Vp, (r + 1) * Vp) of every view's logits, and of
the LM head's rows ([Vp, D] of the [V, D] head, and [Vp] of its bias). Labels are global ids,
the same on every rank, as are the hidden states that feed the head.

The same passes as on one device, with all-reduces of the row statistics in between: the label
log-prob kernel of the backend streams each view's shard once in its own dtype (no float32
copy) and gives its log-sum-exp; one MAX all-reduce of those [k, N] and one SUM all-reduce of
``exp(lse_r - max)`` with the label logits [2k, N] (the label logit is 0 on every rank but the
one that holds it) give every rank the global statistics of every view. From there the rule is
row-local and the per-sample stage works on [N] tensors, so every rank decides the same
saliency, weights and loss; the gradient of each rank's columns,
``coef * (softmax - onehot)``, needs nothing from the other ranks: backward writes it once from
the global lse (``GradStore.BACKWARD``). The linear form multiplies the hidden states by the
local rows of the head in the input dtype; its hidden-state gradient is a sum over the
vocabulary, so it is all-reduced (SUM) in backward, as Megatron's column-parallel linear does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nlft_kernels.backends import implementation
from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.contracts import ViewMode, acc_dtype
from nlft_kernels.ops.inputs import Views
from nlft_kernels.ops.row_rule import row_saliency


def group_name(group) -> str:
    """The name by which an op finds ``group`` (a custom op takes strings, not process groups)."""
    return group.group_name


def resolve_group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def shard_range(vocab_shard: int, group) -> tuple[int, int]:
    """[start, stop) of this rank's columns in the global vocabulary (Megatron's layout)."""
    rank = dist.get_rank(group)
    return rank * vocab_shard, (rank + 1) * vocab_shard


def global_vocab(vocab_shard: int, group) -> int:
    return vocab_shard * dist.get_world_size(group)


def shard_labels(labels: torch.Tensor, offset: int, vocab_shard: int, ignore_index: int) -> torch.Tensor:
    """Labels as column indices of the shard that starts at ``offset``: a label in another shard
    becomes an index past the shard's end (read by no kernel, no one-hot), ``ignore_index``
    stays."""
    local = labels - offset
    elsewhere = (local < 0) | (local >= vocab_shard)
    past_end = vocab_shard if ignore_index != vocab_shard else vocab_shard + 1
    return torch.where(labels == ignore_index, labels, torch.where(elsewhere, past_end, local))


def shard_statistics(shards: list[torch.Tensor], labels, offset: int, ignore_index: int, backend: str, group):
    """(log p(label) [k, N], lse [k, N]) over the global vocabulary of k views given as this
    rank's shards [B, T, Vp] (any float dtype, read once by the backend's label kernel); two
    all-reduces for all k views together. Padding rows: lse log(P), log-prob -log(P)."""
    vocab_shard = shards[0].shape[-1]
    local = shard_labels(labels, offset, vocab_shard, ignore_index)
    rows = torch.arange(labels.numel(), device=labels.device)
    steps = shards[0].shape[1]
    here = (local >= 0) & (local < vocab_shard)
    safe = torch.where(here, local, 0)
    label_kernel = implementation(backend).label_logprobs
    lses, picked = [], []
    for x in shards:
        _, lse = label_kernel(x, local, ignore_index)
        lses.append(lse)
        picked.append(torch.where(here, x[rows // steps, rows % steps, safe].to(lse.dtype), 0.0))
    maxima = torch.stack(lses)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    both = torch.cat([torch.exp(torch.stack(lses) - maxima), torch.stack(picked)])
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    sums, labels_logit = both[: len(shards)], both[len(shards) :]
    lse = maxima + sums.log()
    return labels_logit - lse, lse


def first_stage_vocab_parallel(v: Views, cfg: NLFTConfig, backend: str, name: str, offset: int):
    """The first stage on this rank's shards: (stats [3, N] log-probs of base/standard/judge,
    saliency [N] bool, lse [N] of the base view over the whole vocabulary)."""
    group = resolve_group(name)
    shards = [v.base] + [view for view, mode in ((v.standard, v.standard_mode), (v.judge, v.judge_mode))
                         if mode == ViewMode.LOGITS]  # fmt: skip
    lps, lses = shard_statistics(shards, v.labels, offset, cfg.ignore_index, backend, group)
    rest = iter(lps[1:])
    lp_b = lps[0]
    lp_s = next(rest) if v.standard_mode == ViewMode.LOGITS else v.standard
    lp_j = next(rest) if v.judge_mode == ViewMode.LOGITS else v.judge
    if lp_j is None:
        lp_j = torch.zeros_like(lp_b)
    valid = v.labels != cfg.ignore_index
    in_range = (v.labels >= 0) & (v.labels < v.base.shape[-1] * dist.get_world_size(group))
    nan = torch.full_like(lp_b, float("nan"))
    lp_b = torch.where(valid, torch.where(in_range, lp_b, nan), 0.0)
    lp_s = torch.where(valid, lp_s, 0.0)
    lp_j = torch.where(v.wrong & valid, lp_j, 0.0)
    saliency = row_saliency(lp_b, lp_s, lp_j, v.wrong, valid & in_range, cfg)
    return torch.stack([lp_b, lp_s, lp_j]), saliency, torch.where(valid, lses[0], 0.0)


class AllReduceGrad(torch.autograd.Function):
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
    ``weight`` [Vp, D]: in the input dtype (``F.linear``: a 16-bit GEMM with float32
    accumulation for 16-bit inputs, as the chunks of ``nlft_linear_loss``), or with ``wide`` in
    ACC (the teachers' log-probs, as ``linear_token_logprobs``'s float32 tiles); the gradient of
    ``hidden`` is all-reduced over ``group`` in backward."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        hidden = AllReduceGrad.apply(hidden, group)
    if not wide:
        return torch.nn.functional.linear(hidden, weight, bias)
    acc = acc_dtype(weight.dtype)
    logits = hidden.to(acc) @ weight.to(acc).t()
    return logits if bias is None else logits + bias.to(acc)
