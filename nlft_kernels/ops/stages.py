"""The two stages of every NLFT loss path.

The first stage is the row pass of a backend (``nlft_kernels.backends``): per row, the label
log-probs of the three views, saliency and the provisional gradient
``coef * (softmax - onehot)`` of the base logits. Two parts of the rule are not row-local: the
6% rule (a wrong sample whose saliency share is above ``saliency_fraction`` zeroes its
ordinary tokens) and saliency clusters. The second stage decides them on [N]-sized statistics
and says which gradient rows to rescale; in the common case it touches none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nlft_kernels.backends import implementation
from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.contracts import ViewMode
from nlft_kernels.ops.inputs import Views
from nlft_kernels.ops.row_rule import row_terms
from nlft_kernels.ops.saliency_clusters import saliency_clusters


def first_stage(v: Views, cfg: NLFTConfig, backend: str, compute_grad: bool):
    """The row pass: (stats [3, N] ACC log-probs of base/standard/judge, saliency [N] bool,
    provisional gradient of ``v.base`` or None). The gradient rows hold everything but the
    per-sample rule and the clusters, which ``second_stage`` decides."""
    return implementation(backend).row_pass(v, cfg, compute_grad)


def rescale_rows(grad: torch.Tensor, factor: torch.Tensor, rows: torch.Tensor, backend: str) -> None:
    """grad[r] *= factor[r] for the rows ``rows`` (a few, usually none), in place."""
    implementation(backend).scale_rows(grad, factor, rows)


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
    backend: str | None = None,
) -> SecondStage:
    """The per-sample rule (saliency fraction), the clusters, the loss and the gradient fix-up.

    Works on [N]-sized tensors only; ``hidden_states`` [N, D] or None; ``backend`` picks the
    cluster walk (``saliency_clusters``).
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
        cluster = saliency_clusters(hidden_states.detach(), saliency, valid, sample_ids, cfg, backend)
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
        ("base_logits", "standard", "judge"), bad, (ViewMode.LOGITS, v.standard_mode, v.judge_mode), strict=True
    ):
        if is_bad:
            what = "logits" if mode == ViewMode.LOGITS else "log-probs"
            raise ValueError(
                f"{name} contains non-finite values ({what}: NaN, +inf, or -inf at a label) in a labelled row"
            )


@dataclass
class NLFTLossParams:
    """Everything of one ``nlft_loss`` call but the base logits (which ``views.base`` reads).

    views: the rows (``ops/inputs.py``); sample_ids [N]; correct [S]; hidden_states: the base
    view's states for the clusters, or None; backend: resolved; grad_on: the caller's grad mode
    (``NLFTLossFunction.forward`` runs under no_grad, and needs_input_grad ignores an outer
    torch.no_grad()).
    """

    views: Views
    sample_ids: torch.Tensor
    correct: torch.Tensor
    hidden_states: torch.Tensor | None
    cfg: NLFTConfig
    reduction: str
    backend: str
    validate: bool
    grad_on: bool


def nlft_stages(p: NLFTLossParams, compute_grad: bool) -> tuple[SecondStage, torch.Tensor | None]:
    """Both stages over all rows of ``p.views``: (the second stage's decisions, the final
    gradient of ``p.views.base`` or None)."""
    stats, saliency, grad = first_stage(p.views, p.cfg, p.backend, compute_grad)
    hidden = None if p.hidden_states is None else p.hidden_states.reshape(saliency.numel(), -1)
    stage = second_stage(
        stats, saliency, p.views, p.sample_ids, p.correct, hidden, p.cfg, p.reduction, p.validate, p.backend
    )
    if grad is not None and stage.rows.numel():
        rescale_rows(grad, stage.factor, stage.rows, p.backend)
    return stage, grad
