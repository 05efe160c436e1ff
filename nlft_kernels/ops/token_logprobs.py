"""Label log-probabilities of logits rows, fused: one streaming pass, no [N, V] temporary."""

from __future__ import annotations

import torch

from nlft_kernels.ops.autograd import TokenLogprobsFunction
from nlft_kernels.ops.inputs import as_3d, check_labels, check_logits
from nlft_kernels.ops.loss_ops import TokenLogprobsArgs


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, backend: str = "auto", validate: bool = True
) -> torch.Tensor:
    """log p(label) for each row: ``logits`` [B, T, V] or [N, V] (fp32/bf16/fp16/fp64), ``labels``
    [B, T] or [N] int64 -> float32 (float64 for float64 logits) shaped like ``labels``, 0 at
    ``ignore_index``. Differentiable in ``logits``: backward writes the gradient once, from the
    saved lse; never builds a [N, V] temporary in forward.

    ``validate`` checks label range and finiteness (host syncs, inside the op: eagerly and
    under ``torch.compile``); turn it off in hot loops.
    """
    check_logits(logits, "logits")
    labels = check_labels(labels, logits)
    args = TokenLogprobsArgs(
        logits=as_3d(logits.detach(), "logits"),
        labels=labels.reshape(-1).contiguous(),
        ignore_index=ignore_index,
        backend=backend,
        validate=validate,
    )
    return TokenLogprobsFunction.apply(logits, args).view(labels.shape)
