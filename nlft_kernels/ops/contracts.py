"""What crosses from Python into the row kernels (Triton, the C++ and CUDA kernels of
``nlft_kernels._C``) by name, never by a hand-kept positional order.

- ``ViewMode``: how a teacher view reaches a kernel; the values of ``enum ViewMode`` in
  ``csrc/nlft_row.h`` (tests/csrc/test_contracts.py reads the header).
- ``RuleConstants``: the ``NLFTConfig`` constants in the form the kernels compare against;
  its field names are the Triton kernel's parameters, the bindings' keyword arguments and
  the members of ``RowConfig`` in ``csrc/nlft_row.h``, so every launch passes it as keywords.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import IntEnum

import torch

from nlft_kernels.config import NLFTConfig


class ViewMode(IntEnum):
    """How a teacher view (standard, judge) reaches the row kernels."""

    NONE = 0  # absent (a judge when every sample is correct)
    LOGITS = 1  # [B, T, V] logits, streamed by the kernel
    LOGPROBS = 2  # [N] label log-probs in the accumulator dtype


class GradStore(IntEnum):
    """When and where the gradient of the logits is written: once, in the logits dtype.

    FORWARD: the row pass writes the provisional gradient ``coef * (softmax - onehot)`` while it
    reads the row (Liger's design: fwd+bwd reads each view once and writes the gradient once);
    backward applies the per-sample fix-up and ``grad_output`` in one pass that skips rows whose
    total factor is 1. BACKWARD: forward keeps the row statistics only, backward writes
    ``grad_output * coef * (softmax - onehot)`` from the saved lse, reading the base row a second
    time: float16 logits (GradScaler's factor, up to 2**16, arrives with ``grad_output``; stored
    before it, most of a row's entries flush to 0: ``benchmarks/fp16_gradient_underflow.py``)
    and vocabulary-parallel shards (the rule needs every rank's statistics first).
    """

    NONE = 0
    FORWARD = 1
    BACKWARD = 2

    @classmethod
    def of(cls, dtype: torch.dtype, wanted: bool, vocab_parallel: bool = False) -> GradStore:
        if not wanted:
            return cls.NONE
        return cls.BACKWARD if dtype == torch.float16 or vocab_parallel else cls.FORWARD


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_or_neg_inf(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


@dataclass(frozen=True)
class RuleConstants:
    """The row rule's constants (``RowConfig`` in csrc/nlft_row.h): ``log_ratio`` and
    ``log_judge_min`` are logs of the config's thresholds (-inf for a minimum of 0)."""

    ignore_index: int
    tau: float
    saliency_power: float
    other_power: float
    log_ratio: float
    log_judge_min: float
    sigmoid_center: float
    sigmoid_scale: float
    unlikelihood_clamp: float
    nll_weight: float

    @classmethod
    def of(cls, cfg: NLFTConfig) -> RuleConstants:
        return cls(
            ignore_index=cfg.ignore_index,
            tau=cfg.correct_threshold,
            saliency_power=cfg.saliency_power,
            other_power=cfg.other_power,
            log_ratio=math.log(cfg.ratio_threshold),
            log_judge_min=log_or_neg_inf(cfg.judge_min_prob),
            sigmoid_center=cfg.sigmoid_center,
            sigmoid_scale=cfg.sigmoid_scale,
            unlikelihood_clamp=cfg.unlikelihood_clamp,
            nll_weight=cfg.nll_weight,
        )

    def kwargs(self) -> dict[str, float | int]:
        """The constants as keyword arguments of a kernel launch or a bound call."""
        return asdict(self)

    def floats(self) -> list[float]:
        """The float constants in field order (a torch.library op takes a list, not a dataclass)."""
        return [float(getattr(self, f.name)) for f in fields(self) if f.name != "ignore_index"]

    @classmethod
    def from_floats(cls, floats: list[float], ignore_index: int) -> RuleConstants:
        names = [f.name for f in fields(cls) if f.name != "ignore_index"]
        return cls(ignore_index=ignore_index, **dict(zip(names, floats, strict=True)))
