"""The NLFT loss of one collated batch (:class:`nlft_kernels.training.data.NLFTCollator`): the one
code that the trainer (:func:`nlft_kernels.training.nlft_step`, ``NLFTTrainer.compute_loss``),
the sharded engines and the saliency map (:mod:`nlft_kernels.saliency_map`) run.

Per batch: the teacher views first, without gradient (the standard view for every sample, the
judge view for the wrong ones; their activations are freed at once, before the base view's
are kept), then the base view with gradient. Of each view only the final hidden states are
taken (a forward hook on the decoder; ``logits_to_keep=1`` spares the full logits) at the
rows that predict the response tokens (row ``r`` of every view predicts ``labels[:, r]``); the
teachers' label log-probs come from :func:`nlft_kernels.linear_token_logprobs` and the loss
from :func:`nlft_kernels.nlft_linear_loss`: no [N, V] logits tensor exists in any view. With
``judge_nll_weight > 0`` the judge view runs with gradient, batched with the base view into
one forward (DDP allows one forward per backward). How each view reaches the LM head's weight
(whole here, or only inside the head's forward under FSDP/ZeRO-3) is the one varying part:
:class:`nlft_kernels.training.heads.HeadAccess`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nlft_kernels import linear_token_logprobs, nlft_linear_loss
from nlft_kernels.config import NLFTConfig
from nlft_kernels.training.heads import HeadAccess, HeadFn, head_access

# Rows per chunk of the judge-view NLL: logits chunks of about this many bytes (float32).
_JUDGE_NLL_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class HostPlan:
    """What the batch loss reads of a batch on the host, in one read: no host sync while the batch
    is still on the host (as the collator leaves it), one otherwise (the Trainer moves batches
    to the device first). wrong: the wrong samples; standard_length: the longest standard
    prompt + response; judge_length: the longest judge one among the wrong samples (0: none)."""

    wrong: list[int]
    standard_length: int
    judge_length: int

    @classmethod
    def of(cls, batch: dict[str, torch.Tensor]) -> HostPlan:
        correct = batch["correct"].bool()
        lengths = torch.stack(
            [correct.long(), batch["standard_attention_mask"].sum(1), batch["judge_attention_mask"].sum(1)]
        ).tolist()
        wrong = [b for b, ok in enumerate(lengths[0]) if not ok]
        return cls(wrong, max(lengths[1]), max((lengths[2][b] for b in wrong), default=0))


@dataclass(frozen=True)
class ViewInputs:
    """One view of (some samples of) a batch: ``input_ids``/``attention_mask`` [b, L] without
    all-padding columns at the right, ``rows`` [b, R] the positions that predict the labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def of(
        cls, batch: dict[str, torch.Tensor], view: str, index: torch.Tensor | None, length: int, pad_token_id: int
    ) -> ViewInputs:
        """``view`` of samples ``index`` (all when None), trimmed to ``length`` columns. No sample
        at all gives one pad-token row: a forward that every rank must run still runs."""
        ids, mask, rows = (batch[f"{view}_{k}"] for k in ("input_ids", "attention_mask", "rows"))
        if index is not None:
            ids, mask, rows = ids[index], mask[index], rows[index]
        if ids.shape[0] == 0:
            return cls(ids.new_full((1, 1), pad_token_id), mask.new_ones((1, 1)), rows)
        return cls(ids[:, :length], mask[:, :length], rows)

    def run(self, access: HeadAccess, model: nn.Module, fn: HeadFn):
        return access.forward(model, self.input_ids, self.attention_mask, fn)


def gather_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, R, D] rows ``rows`` [B, R] of ``hidden`` [B, L, D]."""
    return hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def pad_cat(tensors: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """Right-pad [b_i, L_i] tensors to the longest L and stack them along the batch."""
    length = max(t.shape[1] for t in tensors)
    return torch.cat([nn.functional.pad(t, (0, length - t.shape[1]), value=value) for t in tensors])


def match_dtypes(hidden, weight, bias):
    """Inside autocast: both in the autocast dtype (as F.linear would); else hidden in weight's dtype."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _chunk_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore):
    logits = nn.functional.linear(hidden, weight, bias).float()
    return nn.functional.cross_entropy(logits, labels, ignore_index=ignore, reduction="none")


def judge_nll(hidden, weight, bias, labels, ignore_index: int = -100) -> torch.Tensor:
    """Per-sample mean ``-log p(label)`` [B] of ``hidden`` [B, R, D] rows under the LM head, with
    gradient; chunked over rows and recomputed in backward (checkpointing), so that at most one
    [chunk, V] logits chunk is alive."""
    flat, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    rows = max(1, _JUDGE_NLL_CHUNK_BYTES // (4 * weight.shape[0]))
    parts = [
        torch.utils.checkpoint.checkpoint(
            _chunk_nll, flat[i : i + rows], weight, bias, flat_labels[i : i + rows], ignore_index, use_reentrant=False
        )
        for i in range(0, flat.shape[0], rows)
    ]
    nll = torch.cat(parts).view(labels.shape)
    return nll.sum(1) / (labels != ignore_index).sum(1).clamp(min=1)


def label_logprobs(rows: torch.Tensor, labels: torch.Tensor, ignore_index: int, validate: bool = True) -> HeadFn:
    """The :data:`HeadFn` of a teacher view: [b, R] float32 log-probs of ``labels`` [b, R] at the
    hidden states' ``rows`` [b, R] (zeros [0, R] for no sample)."""

    def fn(hidden, weight, bias):
        if labels.shape[0] == 0:
            return torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        h, w, b = match_dtypes(gather_rows(hidden, rows), weight, bias)
        return linear_token_logprobs(h, w, labels, b, ignore_index=ignore_index, validate=validate)

    return fn


def nlft_batch_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    config: NLFTConfig = NLFTConfig(),
    *,
    judge_nll_weight: float = 0.0,
    lm_head: nn.Module | None = None,
    pad_token_id: int = 0,
    validate: bool = True,
    return_details: bool = False,
):
    """The NLFT loss (a float32 scalar with gradient) of ``batch`` (from :class:`NLFTCollator`);
    with ``return_details``, ``(loss, details)``: the :class:`nlft_kernels.NLFTDetails` of the
    base view's tokens (what the saliency map shows).

    ``sample_mean`` reduction: the spec's mean over samples of
    ``loss_scale * (sum_t token_loss + nll_weight * sum_t NLL_t) / n``; with
    ``judge_nll_weight > 0``, each wrong sample adds ``judge_nll_weight * mean_t(-log p_j)``
    (judge view, aligned rows, with gradient) before the mean over the B samples;
    ``judge_nll_weight=10`` reproduces the authors' scale of that term (they add it inside the
    loss that ``loss_scale = 10`` multiplies), 0 leaves the judge view a pure teacher.
    ``lm_head``: the module whose weight [V, D] (and bias) map final hidden states to logits;
    default: the model's output embeddings. ``pad_token_id``: fills the judge rows batched with
    the base view. ``validate``: the ops' input checks (label range, finite log-probs and
    logits): 15 of the step's 28 host syncs at batch 4 (see ``tests/training/test_host_syncs.py``);
    off, a NaN shows as a NaN loss instead of an error.

    A model whose parameters are sharded (FSDP2 ``fully_shard``, FSDP1, DeepSpeed ZeRO-3) gets
    the same loss, each view's head work inside the head's forward and the same forwards on
    every rank: the judge view (without ``judge_nll_weight``) runs a one-token dummy row on a
    rank that has no wrong sample.
    """
    if judge_nll_weight < 0 or not math.isfinite(judge_nll_weight):
        raise ValueError(f"judge_nll_weight must be a finite number >= 0, got {judge_nll_weight}")
    access = head_access(model, lm_head)
    plan = HostPlan.of(batch)
    batch = {k: v.to(access.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    labels, correct, ignore = batch["labels"], batch["correct"].bool(), config.ignore_index
    wrong = torch.tensor(plan.wrong, dtype=torch.int64).to(labels.device, non_blocking=True)
    judge_grad = judge_nll_weight > 0 and bool(plan.wrong)

    teacher = access.teacher(model)
    judge = None
    with torch.no_grad():
        view = ViewInputs.of(batch, "standard", None, plan.standard_length, pad_token_id)
        standard = view.run(access, teacher, label_logprobs(view.rows, labels, ignore, validate))
        # Under a collective access every rank decides alike: from the weight, not its own samples.
        if judge_nll_weight == 0 and (plan.wrong or access.collective):
            view = ViewInputs.of(batch, "judge", wrong, plan.judge_length, pad_token_id)
            judge_wrong = view.run(access, teacher, label_logprobs(view.rows, labels[wrong], ignore, validate))
            if plan.wrong:
                judge = torch.zeros_like(standard)
                judge[wrong] = judge_wrong

    ids, mask = batch["base_input_ids"], batch["base_attention_mask"]
    size = ids.shape[0]
    if judge_grad:
        view = ViewInputs.of(batch, "judge", wrong, plan.judge_length, pad_token_id)
        ids, mask = pad_cat([ids, view.input_ids], pad_token_id), pad_cat([mask, view.attention_mask], 0)
    details = []

    def loss_fn(hidden, weight, bias):
        judge_view = judge
        if judge_grad:  # the judge rows ride in this forward: their log-probs as a teacher, without gradient
            judge_logprobs = label_logprobs(batch["judge_rows"][wrong], labels[wrong], ignore, validate)
            with torch.no_grad():
                judge_view = torch.zeros_like(standard)
                judge_view[wrong] = judge_logprobs(hidden[size:].detach(), weight, bias)
        h, w, b = match_dtypes(gather_rows(hidden[:size], batch["base_rows"]), weight, bias)
        loss = nlft_linear_loss(
            h, w, labels, correct, standard=standard, judge=judge_view, bias=b, config=config,
            return_details=return_details, validate=validate,
        )  # fmt: skip
        if return_details:
            loss, found = loss
            details.append(found)
        if judge_grad:
            h, w, b = match_dtypes(gather_rows(hidden[size:], batch["judge_rows"][wrong]), weight, bias)
            loss = loss + judge_nll_weight * judge_nll(h, w, b, labels[wrong], ignore).sum() / size
        return loss

    loss = access.forward(model, ids, mask, loss_fn)
    return (loss, details[0]) if return_details else loss
