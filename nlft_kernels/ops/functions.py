"""The autograd Functions of the fused ops. Each takes its differentiable tensors and one
params object (the rest of the call), and runs the stages of ``ops/stages.py`` or the chunked
passes of ``ops/linear_chunks.py`` through a backend of ``nlft_kernels.backends``.

The NLFT losses compute their gradients in forward and store them (as in Liger-Kernel's fused
linear cross-entropy); backward scales them by ``grad_output`` in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nlft_kernels.backends import implementation
from nlft_kernels.ops.inputs import DETAIL_FIELDS, as_3d
from nlft_kernels.ops.linear_chunks import NLFTLinearLossParams, linear_forward, linear_none_backward
from nlft_kernels.ops.stages import NLFTLossParams, nlft_stages


def saved_grads(ctx) -> tuple:
    """The gradients stored by forward; a clear error when a first backward already spent them."""
    if getattr(ctx, "grad_spent", False):
        raise RuntimeError(
            "nlft_loss: backward ran twice through one forward; its gradient is stored once and "
            "scaled in place by the first backward (run the forward again instead of retain_graph=True)"
        )
    return ctx.saved_tensors


def scale_saved_grad(ctx, grad: torch.Tensor, grad_loss: torch.Tensor) -> None:
    """grad *= grad_loss in place (per row for ``reduction="none"``): gradient accumulation and
    loss scaling pass a ``grad_loss`` other than 1, and a product out of place would hold a
    second buffer of the gradient's size ([N, V] here; [V, D] for the linear loss's weight) at
    the peak. The buffer is then spent: a second backward through the same forward
    (``retain_graph=True``) raises (``saved_grads``) instead of scaling twice."""
    if ctx.reduction == "none":
        grad.view(-1, grad.shape[-1]).mul_(grad_loss.reshape(-1, 1))
        ctx.grad_spent = True
    elif not bool(grad_loss == 1):
        grad.mul_(grad_loss)
        ctx.grad_spent = True


def _details(ctx, per_row: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    details = tuple(per_row[name] for name in DETAIL_FIELDS)
    ctx.mark_non_differentiable(*details)
    return details


# ---------------------------------------------------------------------------------------------
# token_logprobs


@dataclass
class TokenLogprobsParams:
    """labels: [N] int64 (contiguous); backend: resolved (``resolve_backend``)."""

    labels: torch.Tensor
    ignore_index: int
    backend: str


class TokenLogprobsFunction(torch.autograd.Function):
    """log p(label) [N] of ``logits`` [B, T, V] or [N, V]; backward recomputes the softmax from lse."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, p: TokenLogprobsParams):
        x = as_3d(logits, "logits")
        lp, lse = implementation(p.backend).label_logprobs(x, p.labels, p.ignore_index)
        ctx.save_for_backward(x, p.labels, lse)
        ctx.ignore_index, ctx.backend, ctx.logits_shape = p.ignore_index, p.backend, logits.shape
        return lp

    @staticmethod
    def backward(ctx, grad_lp: torch.Tensor):
        x, labels, lse = ctx.saved_tensors
        backward = implementation(ctx.backend).label_logprobs_backward
        grad = backward(x, labels, lse, grad_lp.reshape(-1), ctx.ignore_index)
        return grad.view(ctx.logits_shape), None


# ---------------------------------------------------------------------------------------------
# nlft_loss


class NLFTLossFunction(torch.autograd.Function):
    """The NLFT loss of the base logits; the gradient is computed in forward and stored.

    Returns the loss and the per-row details (non-differentiable, in ``DETAIL_FIELDS`` order).
    backward multiplies the stored gradient by ``grad_output`` (per row for ``"none"``). The
    teacher views (standard, judge) and the hidden states get no gradient.
    """

    @staticmethod
    def forward(ctx, base_logits, p: NLFTLossParams):
        stage, grad = nlft_stages(p, p.grad_on and ctx.needs_input_grad[0])
        ctx.reduction = p.reduction
        ctx.logits_shape = base_logits.shape
        ctx.save_for_backward(grad)
        return (stage.loss, *_details(ctx, stage.per_row))

    @staticmethod
    def backward(ctx, grad_loss, *_grad_details):
        (grad,) = saved_grads(ctx)
        if grad is None:
            return None, None
        scale_saved_grad(ctx, grad, grad_loss)
        return grad.view(ctx.logits_shape), None


# ---------------------------------------------------------------------------------------------
# nlft_linear_loss


class NLFTLinearLossFunction(torch.autograd.Function):
    """The NLFT loss of ``hidden @ weight.T + bias``, chunked over rows.

    Returns the loss and the per-row details (non-differentiable, ``DETAIL_FIELDS`` order).
    For reductions to a scalar, forward computes and stores the gradients of hidden [N, D],
    weight [V, D] and bias [V] and backward scales them by ``grad_output``; for ``"none"``,
    backward recomputes them with the per-row ``grad_output``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, p: NLFTLinearLossParams):
        want = tuple(p.train and need for need in ctx.needs_input_grad[:3])
        result, grads = linear_forward(hidden, weight, bias, p, want)
        ctx.reduction = p.reduction
        if p.reduction == "none":
            ctx.p, ctx.want = p, want
            ctx.save_for_backward(hidden, weight, bias, result.factor)
        else:
            # Kept in the parameters' dtypes between forward and backward.
            ctx.save_for_backward(*grads)
        return (result.loss, *_details(ctx, result.per_row))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_grad_details):
        if ctx.reduction != "none":
            grads = saved_grads(ctx)
            for grad in grads:  # in place: no second [V, D] weight gradient at the peak
                if grad is not None:
                    scale_saved_grad(ctx, grad, grad_loss)
            return (*grads, None)
        hidden, weight, bias, factor = ctx.saved_tensors
        p = ctx.p
        grads = linear_none_backward(
            hidden, weight, bias, p.views, p.cfg, p.backend, p.rows, ctx.want, factor, grad_loss
        )
        return (*grads, None)
