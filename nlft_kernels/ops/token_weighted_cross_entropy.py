"""The token-weighted cross-entropy: ``-w_t * log p(y_t)`` per token, fused.

After the NLFT rule decides each token's weight, NLFT's gradient is a cross-entropy with a
per-token weight; so are TRL's DFT (``w_t = p(y_t)``, detached) and weighted SFT. The same
fused pass as the NLFT loss's: one streaming read of each row gives its log-sum-exp, its label
log-prob and, in the same program, its gradient ``w_t * scale * (softmax - onehot)`` written
once in the logits dtype (in forward for float32/bfloat16; in backward for float16, where
GradScaler's factor arrives first: see ``GradStore``), into the logits' own storage with
``inplace_grad``. ``linear_token_weighted_cross_entropy`` is the same from hidden states,
chunked: the [N, V] logits never exist.
"""

from __future__ import annotations

import torch

from nlft_kernels.ops.autograd import LinearTokenWeightedCEFunction, TokenWeightedCEFunction
from nlft_kernels.ops.contracts import GradStore
from nlft_kernels.ops.inputs import as_3d, check_labels, check_logits
from nlft_kernels.ops.linear_ce import LinearCEArgs
from nlft_kernels.ops.linear_chunks import flat_rows_2d
from nlft_kernels.ops.linear_ops import head_fields
from nlft_kernels.ops.loss_ops import CETokenFields, WeightedCEArgs
from nlft_kernels.ops.nlft_linear_loss import _checked_linear, _logits_proxy
from nlft_kernels.ops.nlft_loss import check_inplace
from nlft_kernels.reference import CE_REDUCTIONS

__all__ = ["CE_REDUCTIONS", "linear_token_weighted_cross_entropy", "token_weighted_cross_entropy"]


def _checked_weights(weights, labels: torch.Tensor) -> torch.Tensor:
    if not isinstance(weights, torch.Tensor) or not weights.dtype.is_floating_point:
        raise ValueError(f"weights must be a float tensor shaped like labels, got {getattr(weights, 'dtype', weights)}")
    if weights.shape != labels.shape:
        raise ValueError(f"weights must have the labels' shape {tuple(labels.shape)}, got {tuple(weights.shape)}")
    if weights.device != labels.device:
        raise ValueError(f"weights is on {weights.device} but labels is on {labels.device}")
    return weights.detach().reshape(-1)


def _token_fields(
    labels: torch.Tensor, weights, ignore_index: int, reduction: str, backend: str, validate: bool
) -> CETokenFields:
    """The checked per-token fields both cross-entropies pass to their op: labels (checked by the
    caller) and weights flattened to [N], the weights shaped like the labels, a known reduction."""
    weights = _checked_weights(weights, labels)
    if reduction not in CE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {CE_REDUCTIONS}, got {reduction!r}")
    return CETokenFields(labels.reshape(-1).contiguous(), weights, ignore_index, reduction, backend, validate)


def token_weighted_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    inplace_grad: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """``-weights * log p(labels)`` of ``logits`` [B, T, V] or [N, V] (fp32/bf16/fp16/fp64).

    labels: [B, T] or [N] int64, ``ignore_index`` marks padding (loss and gradient 0).
    weights: float, shaped like ``labels``: each token's weight, a constant (no gradient flows
      into it; detach it yourself if it comes from the model, as DFT's ``p(y_t)``); 0 and
      negative weights are fine (a row of weight 0 is written as zeros without a second read).
    reduction: ``"mean"`` (the weighted sum over the labelled tokens' count, not over the sum
      of the weights, which may be 0 or negative), ``"sum"``, or ``"none"`` (per token, float32,
      shaped like ``labels``).
    inplace_grad, backend, validate: as in :func:`nlft_kernels.nlft_loss`.

    Returns a float32 loss (float64 for float64 logits). Differentiable in ``logits``.
    """
    check_logits(logits, "logits")
    labels = check_labels(labels, logits)
    tokens = _token_fields(labels, weights, ignore_index, reduction, backend, validate)
    wanted = torch.is_grad_enabled() and logits.requires_grad
    if inplace_grad and wanted:
        check_inplace(logits, "logits")
    grad = int(GradStore.of(logits.dtype, wanted))
    args = WeightedCEArgs(logits=as_3d(logits.detach(), "logits"), **tokens._asdict(), grad=grad)
    loss = TokenWeightedCEFunction.apply(logits, args, inplace_grad and wanted)
    return loss.view(labels.shape) if reduction == "none" else loss


def linear_token_weighted_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """:func:`token_weighted_cross_entropy` of ``hidden @ weight.T + bias``, never materialised:
    ``hidden`` [B, T, D] or [N, D], ``weight`` [V, D] (the LM head), ``bias`` [V] or None, in one
    dtype (or under ``torch.autocast``). Chunks of ``chunk_size`` rows (default from free
    memory, as :func:`nlft_kernels.nlft_linear_loss`): per chunk the logits GEMM, the fused row
    pass writing the gradient over the chunk's logits, and the gradient GEMMs into hidden,
    weight and bias (computed in forward and scaled in backward; ``"none"`` runs the chunks
    again in backward with each row's ``grad_output``)."""
    hidden, weight, bias = _checked_linear(hidden, weight, bias, chunk_size)
    proxy = _logits_proxy(hidden, weight.shape[0])
    check_logits(proxy, "hidden @ weight.T")
    labels = check_labels(labels, proxy)
    tokens = _token_fields(labels, weights, ignore_index, reduction, backend, validate)
    grad_output = torch.ones((), dtype=torch.float32, device=hidden.device)
    args = LinearCEArgs(**head_fields(hidden, weight, bias, chunk_size), **tokens._asdict(), grad_output=grad_output)
    loss = LinearTokenWeightedCEFunction.apply(flat_rows_2d(hidden), weight, bias, args)
    return loss.view(labels.shape) if reduction == "none" else loss
