"""The constants of the NLFT objective (see the spec), validated once on creation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

CLUSTER_CRITERIA = ("distance", "similarity", "off")


@dataclass(frozen=True)
class NLFTConfig:
    """Every constant of the NLFT objective, with the authors' defaults.

    Correct responses: a token is a saliency token when ``p_s > correct_threshold``; its
    weight is ``1 + ((p_s - tau) / (1 - tau)) ** saliency_power``, a cluster neighbour's
    ``(p_s / tau) ** cluster_power`` and any other token's ``(p_s / tau) ** other_power``.

    Wrong responses: a token is a saliency token when ``p_j / p_b > ratio_threshold``,
    ``p_j / p_s > ratio_threshold`` and ``p_j > judge_min_prob``; it is trained by
    unlikelihood with weight ``sigmoid_scale * sigmoid(p_j / p_b - sigmoid_center)`` and
    ``1 - p_b`` clamped below at ``unlikelihood_clamp``. Other tokens get ``sqrt(p_s)``, or 0
    when more than ``saliency_fraction`` of the sample's tokens are saliency tokens.

    Sample loss: ``loss_scale * (sum_t token_loss + nll_weight * sum_t NLL_t) / n``.

    Saliency clusters (only when hidden states are given): a neighbour joins while its cosine
    ``distance`` to the running centre is above ``cluster_threshold`` (the authors' code), or
    while its cosine ``similarity`` is above it; ``off`` disables clusters.

    Every check is in ``__post_init__``; the ``nlft`` command parses the fields with
    ``HfArgumentParser`` (``--correct-threshold 0.9``), under the heading ``_argument_group_name``.
    """

    _argument_group_name = "the NLFT objective (NLFTConfig; defaults: the authors')"

    correct_threshold: float = field(
        default=0.95, metadata={"help": "tau: a correct response's token is a saliency token when p_s > tau"}
    )
    saliency_power: float = field(
        default=5.0,
        metadata={"help": "exponent of a correct saliency token's weight 1 + ((p_s - tau) / (1 - tau)) ** power"},
    )
    cluster_power: float = field(
        default=0.3,
        metadata={"help": "exponent of a cluster neighbour's weight (p_s / tau) ** power (correct responses)"},
    )
    other_power: float = field(
        default=0.6,
        metadata={"help": "exponent of every other token's weight (p_s / tau) ** power (correct responses)"},
    )
    ratio_threshold: float = field(
        default=1.5, metadata={"help": "a wrong response's saliency test: p_j / p_b and p_j / p_s above this"}
    )
    judge_min_prob: float = field(default=0.01, metadata={"help": "a wrong response's saliency test: p_j above this"})
    sigmoid_center: float = field(
        default=1.5, metadata={"help": "theta of the unlikelihood weight scale * sigmoid(p_j / p_b - theta)"}
    )
    sigmoid_scale: float = field(
        default=2.0, metadata={"help": "scale of the unlikelihood weight scale * sigmoid(p_j / p_b - theta)"}
    )
    saliency_fraction: float = field(
        default=0.06, metadata={"help": "above this fraction of saliency tokens, a wrong response's other tokens get 0"}
    )
    unlikelihood_clamp: float = field(
        default=1e-5, metadata={"help": "1 - p_b is clamped below at this in the unlikelihood loss"}
    )
    nll_weight: float = field(
        default=1.0, metadata={"help": "weight of the plain NLL added to a correct response's loss"}
    )
    loss_scale: float = field(default=10.0, metadata={"help": "the sample loss's factor (the authors' 10)"})
    ignore_index: int = field(default=-100, metadata={"help": "label of padding and prompt rows"})
    cluster_criterion: str = field(
        default="distance", metadata={"help": "saliency clusters: distance (the authors' code), similarity or off"}
    )
    cluster_threshold: float = field(
        default=0.4,
        metadata={"help": "a neighbour joins a cluster while its cosine distance (or similarity) passes this"},
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "cluster_criterion":
                continue
            if f.name == "ignore_index":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"NLFTConfig.ignore_index must be an int, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"NLFTConfig.{f.name} must be a finite number, got {value!r}")
        _check(0.0 < self.correct_threshold < 1.0, "correct_threshold", "in (0, 1)")
        for name in ("saliency_power", "cluster_power", "other_power", "sigmoid_scale", "loss_scale"):
            _check(getattr(self, name) > 0.0, name, "> 0")
        _check(self.ratio_threshold > 0.0, "ratio_threshold", "> 0")
        _check(0.0 <= self.judge_min_prob < 1.0, "judge_min_prob", "in [0, 1)")
        _check(0.0 <= self.saliency_fraction <= 1.0, "saliency_fraction", "in [0, 1]")
        _check(0.0 < self.unlikelihood_clamp < 1.0, "unlikelihood_clamp", "in (0, 1)")
        _check(self.nll_weight >= 0.0, "nll_weight", ">= 0")
        if self.cluster_criterion not in CLUSTER_CRITERIA:
            raise ValueError(
                f"NLFTConfig.cluster_criterion must be one of {CLUSTER_CRITERIA}, got {self.cluster_criterion!r}"
            )
        low, high = {"distance": (0.0, 2.0), "similarity": (-1.0, 1.0), "off": (-math.inf, math.inf)}[
            self.cluster_criterion
        ]
        what = f"in [{low:g}, {high:g}] for the {self.cluster_criterion} criterion"
        _check(low <= self.cluster_threshold <= high, "cluster_threshold", what)


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ValueError(f"NLFTConfig.{name} must be {what}")
