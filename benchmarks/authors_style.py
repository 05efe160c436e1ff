"""NLFT computed the way the authors' public training code computes it: the benchmark baseline.

Not part of the package and not meant to be fast: it keeps the costs of the original
implementation so that the fused loss is compared against what users run today. The three
prompt views go through the model as one batch, so their logits arrive as one tensor
[3, B, T, V] that carries gradient as a whole. Each view gets a float32 softmax and
log_softmax over the whole vocabulary, both kept for backward; the label probabilities are
gathered from them; the saliency tests and weights are tensor ops; saliency clusters are
walked token by token in Python with ``.item()`` (only when hidden states are passed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlft_kernels.config import NLFTConfig
from nlft_kernels.reference import token_weights


def authors_style_loss(
    views: torch.Tensor,
    labels: torch.Tensor,
    correct: torch.Tensor,
    config: NLFTConfig = NLFTConfig(),
    hidden_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """The NLFT loss with the spec's sample-mean reduction.

    views: [3, B, T, V] logits of the base, standard and judge views (any float dtype);
    labels: [B, T] int64, ``config.ignore_index`` = padding; correct: [B] bool;
    hidden_states: [B, T, D] base-view states, for saliency clusters. Returns a scalar.
    """
    cfg = config
    correct = correct.bool()
    valid = labels != cfg.ignore_index
    x = views.float()
    log_probs = torch.log_softmax(x, dim=-1)
    probs = torch.softmax(x, dim=-1)
    index = labels.masked_fill(~valid, 0)[None, :, :, None].expand(3, -1, -1, 1)
    lp = log_probs.gather(-1, index).squeeze(-1)
    p = probs.gather(-1, index).squeeze(-1)
    lp_b, p_b_grad = lp[0], p[0]

    with torch.no_grad():  # the weights are constants for the gradient
        p_b, p_s, p_j = p.unbind(0)
        is_correct = correct[:, None].expand_as(labels)
        tau = cfg.correct_threshold
        saliency_correct = is_correct & valid & (p_s > tau)
        r1 = p_j / p_b
        r2 = p_j / p_s
        saliency_wrong = (
            ~is_correct & valid & (r1 > cfg.ratio_threshold) & (r2 > cfg.ratio_threshold) & (p_j > cfg.judge_min_prob)
        )
        saliency = saliency_correct | saliency_wrong
        if hidden_states is None:
            cluster = torch.zeros_like(saliency)
        else:
            cluster = saliency_clusters_loop(hidden_states, saliency, valid, cfg)
        n = valid.sum(dim=1)
        fraction = saliency_wrong.sum(dim=1) / n.clamp(min=1)
        killed = (~correct & (fraction > cfg.saliency_fraction))[:, None].expand_as(labels)
        # The reference's weight formulas, the same tensor ops the authors' code runs (float32,
        # under no_grad, on the [B, T] gathers), so the baseline keeps their cost.
        weight = token_weights(p_s, r1, is_correct, saliency, cluster, killed, cfg)

    unlikelihood = -torch.log(torch.clamp(1 - p_b_grad, min=cfg.unlikelihood_clamp))
    token_loss = torch.where(saliency_wrong, weight * unlikelihood, -weight * lp_b)
    nll = torch.where(is_correct, -lp_b, torch.zeros_like(lp_b))
    per_token = torch.where(valid, token_loss + cfg.nll_weight * nll, torch.zeros_like(lp_b))
    per_sample = cfg.loss_scale * per_token.sum(dim=1) / n.clamp(min=1)
    return per_sample[n > 0].mean()


def saliency_clusters_loop(
    hidden_states: torch.Tensor, saliency: torch.Tensor, valid: torch.Tensor, config: NLFTConfig
) -> torch.Tensor:
    """Cluster neighbours [B, T] bool, walked over the base view's states one token at a time.

    Every test reads one number back to the host with ``.item()``, as the authors' code does;
    this per-token synchronisation is part of the cost being measured.
    """
    cluster = torch.zeros_like(saliency)
    if config.cluster_criterion == "off":
        return cluster
    hidden = hidden_states.detach().float()
    batch, steps = saliency.shape
    for b in range(batch):
        for s in range(steps):
            if not saliency[b, s].item():
                continue
            centre = hidden[b, s]  # one running centre, carried from the left walk into the right
            for direction in (-1, 1):
                k = s + direction
                while 0 <= k < steps and valid[b, k].item():
                    similarity = F.cosine_similarity(hidden[b, k], centre, dim=0).item()
                    score = 1.0 - similarity if config.cluster_criterion == "distance" else similarity
                    if score <= config.cluster_threshold:
                        break
                    if not saliency[b, k].item():
                        cluster[b, k] = True
                    centre = (centre + hidden[b, k]) / 2
                    k += direction
    return cluster
