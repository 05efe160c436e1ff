"""``nn.Module`` forms of the fused ops, for training loops that hold a model's ``lm_head``."""

from __future__ import annotations

import torch
from torch import nn

from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.nlft_linear_loss import linear_token_logprobs, nlft_linear_loss


class NLFTLinearLoss(nn.Module):
    """The NLFT loss of ``lm_head(hidden)`` without materialising the logits.

    ``lm_head``: any module with ``weight`` [V, D] and optional ``bias`` [V] (``nn.Linear``;
    tied embeddings are fine). It is held, not copied: the loss always reads the current
    parameters and its gradients reach them. ``forward`` is :func:`nlft_linear_loss`;
    :meth:`teacher_logprobs` gives a teacher view's label log-probs [B, T] to pass as
    ``standard`` or ``judge``.
    """

    def __init__(
        self,
        lm_head: nn.Module,
        config: NLFTConfig | None = None,
        reduction: str = "sample_mean",
        chunk_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
            raise ValueError(f"lm_head must have a weight tensor [V, D], got {type(lm_head).__name__}")
        self.lm_head = lm_head
        self.config = NLFTConfig() if config is None else config
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.backend = backend

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        correct: torch.Tensor,
        *,
        standard: torch.Tensor,
        judge: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
        return_details: bool = False,
    ):
        """hidden [B, T, D] (or [N, D] with ``sample_ids``) -> the loss (see :func:`nlft_linear_loss`)."""
        return nlft_linear_loss(
            hidden,
            self.lm_head.weight,
            labels,
            correct,
            standard=standard,
            judge=judge,
            bias=getattr(self.lm_head, "bias", None),
            config=self.config,
            reduction=self.reduction,
            sample_ids=sample_ids,
            chunk_size=self.chunk_size,
            return_details=return_details,
            backend=self.backend,
        )

    def teacher_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(label) [B, T] float32 of a teacher view's hidden states [B, T, D], no gradient."""
        return linear_token_logprobs(
            hidden,
            self.lm_head.weight,
            labels,
            getattr(self.lm_head, "bias", None),
            ignore_index=self.config.ignore_index,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, chunk_size={self.chunk_size}, backend={self.backend!r}"
