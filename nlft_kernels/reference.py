"""A plain PyTorch implementation of the NLFT objective, written to be read, not to be fast.

It is the oracle every fast path is tested against: it materialises full log-softmaxes,
walks saliency clusters with Python loops and computes in ``dtype`` (float64 by default).
Shapes: ``B`` samples, ``T`` aligned response rows, ``V`` vocabulary, ``D`` hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlft_kernels.config import NLFTConfig

REDUCTIONS = ("sample_mean", "token_mean", "sum", "none")


def label_logprobs(view: torch.Tensor, labels: torch.Tensor, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    """log p(label) per row: ``view`` is [B, T, V] logits or [B, T] log-probs; returns [B, T]."""
    if view.dim() == labels.dim():
        return view.to(dtype)
    safe = labels.masked_fill(labels == ignore_index, 0)
    return torch.log_softmax(view.to(dtype), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)


def saliency_clusters_reference(
    hidden_states: torch.Tensor,
    saliency: torch.Tensor,
    valid: torch.Tensor,
    config: NLFTConfig,
    carry_centre: bool = True,
) -> torch.Tensor:
    """Cluster neighbours [B, T] bool of the saliency tokens, walking the base view's states.

    The authors' ``token_cluster``: from each saliency token (in order), walk left, then right,
    over consecutive valid rows, with ONE running centre: it starts at the saliency token's
    state, becomes ``(centre + h) / 2`` after each accepted neighbour and is carried from the
    left walk into the right walk (not reset). A walk stops at the first rejected neighbour or
    at the edge of the sample's response. Saliency tokens themselves are never cluster tokens.

    ``carry_centre=False`` restarts the centre at the saliency token's state for the right walk:
    not the authors' walk, kept so that the tests can show their inputs tell the two apart.
    """
    cluster = torch.zeros_like(saliency)
    if config.cluster_criterion == "off":
        return cluster
    hidden = hidden_states.double()
    batch, steps = saliency.shape
    for b in range(batch):
        for s in range(steps):
            if not saliency[b, s]:
                continue
            centre = hidden[b, s]  # one centre for both walks: the right walk starts where the left ended
            for direction in (-1, 1):
                if not carry_centre:
                    centre = hidden[b, s]
                k = s + direction
                while 0 <= k < steps and valid[b, k]:
                    similarity = F.cosine_similarity(hidden[b, k], centre, dim=0).item()
                    if config.cluster_criterion == "distance":
                        accepted = 1.0 - similarity > config.cluster_threshold
                    else:
                        accepted = similarity > config.cluster_threshold
                    if not accepted:
                        break
                    cluster[b, k] = True
                    centre = (centre + hidden[b, k]) / 2
                    k += direction
    return cluster & ~saliency


def nlft_loss_reference(
    base_logits: torch.Tensor,
    labels: torch.Tensor,
    correct: torch.Tensor,
    standard: torch.Tensor,
    judge: torch.Tensor | None = None,
    config: NLFTConfig = NLFTConfig(),
    reduction: str = "sample_mean",
    hidden_states: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    return_details: bool = False,
):
    """The NLFT loss of the spec.

    base_logits: [B, T, V] (gradient flows here); labels: [B, T] int64, ``ignore_index`` =
    padding; correct: [B] bool; standard, judge: [B, T, V] logits or [B, T] log-probs of the
    label (no gradient); hidden_states: [B, T, D] of the base view, for saliency clusters.
    Returns the reduced loss (per-token [B, T] for ``"none"``), and with ``return_details`` a
    dict of per-token tensors.
    """
    cfg = config
    valid = labels != cfg.ignore_index
    n = valid.sum(dim=1)
    is_correct = correct.bool()[:, None].expand_as(labels)

    lp_b = label_logprobs(base_logits, labels, cfg.ignore_index, dtype)
    lp_s = label_logprobs(standard.detach(), labels, cfg.ignore_index, dtype)
    if judge is None:
        lp_j = torch.full_like(lp_b, float("-inf")).detach()
    else:
        lp_j = label_logprobs(judge.detach(), labels, cfg.ignore_index, dtype)
    p_b, p_s, p_j = lp_b.exp(), lp_s.exp(), lp_j.exp()
    tau = cfg.correct_threshold

    saliency_correct = is_correct & valid & (p_s > tau)
    r1 = (p_j / p_b).detach()
    r2 = p_j / p_s
    saliency_wrong = (
        ~is_correct & valid & (r1 > cfg.ratio_threshold) & (r2 > cfg.ratio_threshold) & (p_j > cfg.judge_min_prob)
    )
    saliency = saliency_correct | saliency_wrong

    if hidden_states is not None:
        cluster = saliency_clusters_reference(hidden_states, saliency, valid, cfg)
    else:
        cluster = torch.zeros_like(saliency)

    fraction = saliency_wrong.sum(dim=1) / n.clamp(min=1)
    killed = (~correct.bool() & (fraction > cfg.saliency_fraction))[:, None].expand_as(labels)

    with torch.no_grad():
        weight = token_weights(p_s, r1, is_correct, saliency, cluster, killed, cfg)

    unlikelihood = -torch.log(torch.clamp(1 - p_b, min=cfg.unlikelihood_clamp))
    token_loss = torch.where(saliency_wrong, weight * unlikelihood, -weight * lp_b)
    nll = torch.where(is_correct, -lp_b, torch.zeros_like(lp_b))
    per_token = cfg.loss_scale * (token_loss + cfg.nll_weight * nll)
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))

    if reduction == "none":
        loss = per_token
    elif reduction == "sum":
        loss = per_token.sum()
    elif reduction == "token_mean":
        loss = per_token.sum() / n.sum().clamp(min=1)
    elif reduction == "sample_mean":
        per_sample = per_token.sum(dim=1) / n.clamp(min=1)
        loss = per_sample.sum() / (n > 0).sum().clamp(min=1)
    else:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not return_details:
        return loss
    details = {
        "logprob_base": lp_b.detach(),
        "logprob_standard": lp_s,
        "logprob_judge": lp_j,
        "weight": weight,
        "saliency": saliency,
        "unlikelihood": saliency_wrong,
        "cluster": cluster,
        "killed": killed & valid & ~saliency,
        "token_loss": per_token.detach(),
    }
    return loss, details


def token_weights(
    p_s: torch.Tensor,
    r1: torch.Tensor,
    is_correct: torch.Tensor,
    saliency: torch.Tensor,
    cluster: torch.Tensor,
    killed: torch.Tensor,
    cfg: NLFTConfig,
) -> torch.Tensor:
    """Each token's weight [B, T] in ``p_s``'s dtype, the spec's per-token weights: of a correct
    sample's saliency, cluster and other tokens from ``p_s``; of a wrong one's saliency tokens
    from ``r1``, 0 at its cluster tokens and in a killed sample, else ``sqrt(p_s)``. ``p_s``,
    ``r1``: [B, T]; the rest [B, T] bool. Callers compute it without gradient (constants)."""
    tau = cfg.correct_threshold
    w_correct = torch.where(
        saliency,
        1 + ((p_s - tau) / (1 - tau)) ** cfg.saliency_power,
        torch.where(cluster, (p_s / tau) ** cfg.cluster_power, (p_s / tau) ** cfg.other_power),
    )
    w_wrong = torch.where(
        saliency,
        cfg.sigmoid_scale * torch.sigmoid(r1 - cfg.sigmoid_center),
        torch.where(cluster | killed, torch.zeros_like(p_s), p_s.sqrt()),
    )
    return torch.where(is_correct, w_correct, w_wrong)


def token_logprobs_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log p(label) [B, T] in float64 (0 at ``ignore_index``), differentiable in ``logits``."""
    lp = label_logprobs(logits, labels, ignore_index, torch.float64)
    return torch.where(labels != ignore_index, lp, torch.zeros_like(lp))


CE_REDUCTIONS = ("mean", "sum", "none")


def token_weighted_cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``-w_t * log p(y_t)`` per token in ``dtype``: 0 at ``ignore_index``; ``"mean"`` divides the
    sum by the number of labelled tokens (not by the sum of the weights, which may be 0 or
    negative), ``"sum"`` adds them, ``"none"`` keeps them shaped like ``labels``. The weights are
    constants (no gradient through them)."""
    valid = labels != ignore_index
    logprob = label_logprobs(logits, labels, ignore_index, dtype)
    token = torch.where(valid, -weights.detach().to(dtype) * logprob, torch.zeros((), dtype=dtype))
    if reduction == "none":
        return token
    total = token.sum()
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total
