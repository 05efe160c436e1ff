"""The per-row NLFT rule in PyTorch: the mirror of ``csrc/row_rule.h`` (``decide_row``) and of
the rule inside the Triton row pass (``ops/kernels.py``). The torch backend's row pass and
every backend's second stage use it; tensors are [N] per row."""

from __future__ import annotations

import math

import torch

from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.contracts import log_or_neg_inf


def safe_labels(labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels with those outside [0, V) replaced by 0, which are inside): the torch paths'
    version of the kernels' mask, whose rows then get NaN log-probs (``validate=False``)."""
    in_range = (labels >= 0) & (labels < vocab)
    return torch.where(in_range, labels, 0), in_range


def row_saliency(lp_b, lp_s, lp_j, wrong, valid, cfg: NLFTConfig) -> torch.Tensor:
    """Saliency of each row [N] bool from the three label log-probs [N]."""
    log_r1 = lp_j - lp_b
    saliency_wrong = (
        (log_r1 > math.log(cfg.ratio_threshold))
        & (lp_j - lp_s > math.log(cfg.ratio_threshold))
        & (lp_j > log_or_neg_inf(cfg.judge_min_prob))
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


def row_scale(valid, sample_ids, n_samples: int, reduction: str, loss_scale: float, dtype) -> torch.Tensor:
    """Per-row factor [N] of the reduced loss: ``loss_scale`` times 1/(n_b * samples with
    tokens) for ``sample_mean``, 1/(all tokens) for ``token_mean``, 1 for ``sum``/``none``."""
    scale = valid.to(dtype) * loss_scale
    if reduction == "token_mean":
        return scale / valid.sum().clamp(min=1)
    if reduction == "sample_mean":
        n = torch.zeros(n_samples, dtype=dtype, device=valid.device).index_add_(0, sample_ids, valid.to(dtype))
        return scale / (n[sample_ids].clamp(min=1) * (n > 0).sum().clamp(min=1))
    return scale
