"""Label log-probabilities of logits rows, fused: one streaming pass, no [N, V] temporary."""

from __future__ import annotations

import torch

from nlft_kernels.backends import resolve_backend
from nlft_kernels.ops.custom_ops import token_logprobs_apply
from nlft_kernels.ops.functions import TokenLogprobsFunction, TokenLogprobsParams
from nlft_kernels.ops.inputs import check_labels, check_logits


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, backend: str = "auto", validate: bool = True
) -> torch.Tensor:
    """log p(label) for each row: ``logits`` [B, T, V] or [N, V] (fp32/bf16/fp16/fp64), ``labels``
    [B, T] or [N] int64 -> float32 (float64 for float64 logits) shaped like ``labels``, 0 at
    ``ignore_index``. Differentiable in ``logits``; never builds a [N, V] temporary in forward.

    ``validate`` checks label range and finiteness (one host sync); turn it off in hot loops.
    It is off while ``torch.compile`` traces the call (see ``nlft_kernels.ops.custom_ops``).
    """
    check_logits(logits, "logits")
    if torch.compiler.is_compiling():
        labels = check_labels(labels, logits, ignore_index, validate=False)
        return token_logprobs_apply(logits, labels, ignore_index, backend)
    labels = check_labels(labels, logits, ignore_index, validate)
    params = TokenLogprobsParams(labels.reshape(-1).contiguous(), ignore_index, resolve_backend(backend, logits.device))
    lp = TokenLogprobsFunction.apply(logits, params).view(labels.shape)
    if validate and not bool(torch.isfinite(lp).all()):
        raise ValueError("logits contains non-finite values (NaN or +inf, or -inf at a label) in a labelled row")
    return lp
