"""The autograd formula of each loss: one ``torch.autograd.Function`` per loss, the same eagerly
and under ``torch.compile`` (dynamo traces the Function; the ops it calls, ``ops/loss_ops.py``
and ``ops/linear_ops.py``, stay opaque nodes).

The NLFT losses and the token-weighted cross-entropy write their gradient once: in forward
(``GradStore.FORWARD``, as Liger-Kernel does) with backward's one pass applying the per-row
factor and ``grad_output`` in place (``scale_grad_``), or in backward from the saved lse
(``GradStore.BACKWARD``: float16, vocabulary-parallel shards). Backward then returns that buffer
(or the logits' own storage with ``inplace_grad``). A second backward through the same forward
(``retain_graph=True``, gradcheck) rescales that buffer to its own ``grad_output`` (the tensor
the first backward returned then changes with it); where the logits were overwritten in
backward, it raises (their version counter moved).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nlft_kernels.ops.contracts import GradStore, acc_dtype
from nlft_kernels.ops.linear_ce import LinearCEArgs, LinearCEOut, linear_ce_op
from nlft_kernels.ops.linear_ops import (
    NLFTLinearLossArgs,
    NLFTLinearLossOut,
    nlft_linear_loss_backward_op,
    nlft_linear_loss_op,
)
from nlft_kernels.ops.loss_ops import (
    NLFTLossArgs,
    NLFTLossOut,
    SoftmaxGradArgs,
    TokenLogprobsArgs,
    TokenLogprobsOut,
    WeightedCEArgs,
    WeightedCEOut,
    nlft_loss_inplace_op,
    nlft_loss_op,
    scale_grad_op,
    softmax_grad_inplace_op,
    softmax_grad_op,
    token_logprobs_op,
    weighted_ce_inplace_op,
    weighted_ce_op,
)


def _stash(ctx, args: tuple, *extra: Tensor | None) -> None:
    """Keep an op's arguments for backward: tensors through ``save_for_backward`` (version
    checked), the rest on ``ctx``."""
    ctx.arg_type, ctx.arg_values = type(args), [None if isinstance(v, Tensor) else v for v in args]
    ctx.tensor_fields = [i for i, v in enumerate(args) if isinstance(v, Tensor)]
    ctx.save_for_backward(*[args[i] for i in ctx.tensor_fields], *extra)


def _unstash(ctx) -> tuple[tuple, list]:
    """(the arguments ``_stash`` kept, the extra tensors)."""
    saved = list(ctx.saved_tensors)
    values = list(ctx.arg_values)
    for i, t in zip(ctx.tensor_fields, saved, strict=False):
        values[i] = t
    return ctx.arg_type(*values), saved[len(ctx.tensor_fields) :]


def _gradient_pass(ctx, logits, labels, lse, coef, grad_output) -> Tensor:
    """backward of ``GradStore.BACKWARD``: ``grad_output * coef * (softmax - onehot)``, written
    once into a new buffer, or into the logits with ``inplace_grad``."""
    args = SoftmaxGradArgs(logits, labels, lse, coef, grad_output, ctx.ignore_index, ctx.offset, ctx.backend)
    if ctx.inplace:
        softmax_grad_inplace_op(*args)
        return logits
    return softmax_grad_op(*args)


def _run_logits_loss(ctx, shape: torch.Size, args, inplace: bool, op, inplace_op, offset: int) -> tuple:
    """forward of a loss of logits (``args``: ``NLFTLossArgs`` or ``WeightedCEArgs``): its op, or
    ``inplace_op`` where the gradient goes into the logits in forward, and on ``ctx`` what
    backward reads (``shape``: the caller's logits)."""
    ctx.store, ctx.inplace, ctx.shape = GradStore(args.grad), inplace, shape
    ctx.ignore_index, ctx.offset, ctx.backend = args.ignore_index, offset, args.backend
    return (inplace_op if inplace and ctx.store == GradStore.FORWARD else op)(*args)


def _logits_grad(ctx, grad_loss: Tensor) -> Tensor | None:
    """backward of a loss of logits, shaped as the caller's logits: None (``GradStore.NONE``), the
    gradient stored in forward scaled in place (``FORWARD``: saved with its per-row factor) or
    ``_gradient_pass`` (``BACKWARD``: saved logits, labels, lse and coefficients)."""
    if ctx.store == GradStore.NONE:
        return None
    if ctx.store == GradStore.FORWARD:
        grad, factor = ctx.saved_tensors
        scale_grad_op(grad, factor, grad_loss, ctx.backend)
        return grad.view(ctx.shape)
    logits, labels, lse, coef = ctx.saved_tensors
    return _gradient_pass(ctx, logits, labels, lse, coef, grad_loss).view(ctx.shape)


def _with_details(ctx, loss: Tensor, details: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """forward's return of an NLFT loss: the loss, then the per-token details (``DETAIL_FIELDS``
    order), which get no gradient."""
    ctx.mark_non_differentiable(*details)
    return (loss, *details)


def _save_linear_grads(ctx, out, hidden: Tensor) -> None:
    """Keep the gradients of hidden, weight and bias a linear loss computed in forward, each with
    its factor still to apply (``scale_grad_``)."""
    factors = [torch.ones((), dtype=acc_dtype(hidden.dtype), device=hidden.device) for _ in range(3)]
    ctx.save_for_backward(out.grad_hidden, out.grad_weight, out.grad_bias, *factors)


def _scaled_linear_grads(ctx, grad_loss: Tensor) -> tuple[Tensor, ...]:
    """The gradients ``_save_linear_grads`` kept, each wanted one scaled by ``grad_loss``."""
    saved = ctx.saved_tensors
    for grad, factor, want in zip(saved[:3], saved[3:], ctx.want, strict=True):
        if want:  # in place: no second [V, D] weight gradient at the peak
            scale_grad_op(grad, factor, grad_loss, ctx.backend)
    return saved[:3]


def _wanted_grads(ctx, grads) -> tuple[Tensor | None, ...]:
    """backward's return of a linear loss: the wanted ones of the hidden, weight and bias
    gradients, then None for the arguments."""
    return (*[g if want else None for g, want in zip(grads, ctx.want, strict=True)], None)


class NLFTLossFunction(torch.autograd.Function):
    """The NLFT loss of the base logits (``NLFTLossArgs``; ``base`` is the caller's tensor, of
    which ``args.base`` is the [B, T, V] view). Returns the loss and the per-row details
    (non-differentiable, ``DETAIL_FIELDS`` order); only the base logits get a gradient."""

    @staticmethod
    def forward(ctx, base: Tensor, args: NLFTLossArgs, inplace: bool):
        out = NLFTLossOut._make(
            _run_logits_loss(ctx, base.shape, args, inplace, nlft_loss_op, nlft_loss_inplace_op, args.offset)
        )
        if ctx.store == GradStore.FORWARD:
            ctx.save_for_backward(args.base if inplace else out.grad, out.grad_factor)
        elif ctx.store == GradStore.BACKWARD:
            ctx.save_for_backward(args.base, args.labels, out.lse, out.grad_factor)
        return _with_details(ctx, out.loss, out[4:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_grad_details):
        return _logits_grad(ctx, grad_loss), None, None


class TokenLogprobsFunction(torch.autograd.Function):
    """log p(label) [N] of ``logits`` (``TokenLogprobsArgs``); backward writes the gradient
    ``g * (onehot - softmax)`` once from the saved lse."""

    @staticmethod
    def forward(ctx, logits: Tensor, args: TokenLogprobsArgs):
        out = TokenLogprobsOut._make(token_logprobs_op(*args))
        ctx.save_for_backward(args.logits, args.labels, out.lse)
        ctx.shape, ctx.ignore_index, ctx.backend, ctx.offset, ctx.inplace = (
            logits.shape,
            args.ignore_index,
            args.backend,
            0,
            False,
        )
        return out.logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lp):
        logits, labels, lse = ctx.saved_tensors
        minus_one = lse.new_full((), -1.0).expand(lse.shape)
        return _gradient_pass(ctx, logits, labels, lse, minus_one, grad_lp).view(ctx.shape), None


class NLFTLinearLossFunction(torch.autograd.Function):
    """The NLFT loss of ``hidden @ weight.T + bias`` (``NLFTLinearLossArgs``), chunked over rows.

    For reductions to a scalar, forward computes the gradients of hidden [N, D], weight [V, D]
    and bias [V] and backward scales them by ``grad_output`` in place (skipping the pass where it
    is 1, on the device); for ``"none"``, backward recomputes them with the per-row
    ``grad_output`` (a second chunked pass)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, args: NLFTLinearLossArgs):
        out = NLFTLinearLossOut._make(nlft_linear_loss_op(*args))
        ctx.reduction, ctx.want, ctx.backend = args.reduction, list(args.want), args.backend
        if args.reduction == "none":
            _stash(ctx, args, out.factor)
        else:
            _save_linear_grads(ctx, out, hidden)
        return _with_details(ctx, out.loss, out[5:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_grad_details):
        if ctx.reduction != "none":
            return _wanted_grads(ctx, _scaled_linear_grads(ctx, grad_loss))
        args, (factor,) = _unstash(ctx)
        return _wanted_grads(ctx, nlft_linear_loss_backward_op(*args, factor, grad_loss))


class TokenWeightedCEFunction(torch.autograd.Function):
    """The token-weighted cross-entropy of ``logits`` (``WeightedCEArgs``): its gradient
    ``w * scale * (softmax - onehot)`` written once, in forward by the same pass that reads the
    row (float32, bfloat16) or in backward from the saved lse (float16), as the NLFT loss's."""

    @staticmethod
    def forward(ctx, logits: Tensor, args: WeightedCEArgs, inplace: bool):
        out = WeightedCEOut._make(
            _run_logits_loss(ctx, logits.shape, args, inplace, weighted_ce_op, weighted_ce_inplace_op, 0)
        )
        if ctx.store == GradStore.FORWARD:
            factor = torch.ones_like(out.coef)  # per row: grad_output is per row for "none"
            ctx.save_for_backward(args.logits if inplace else out.grad, factor)
        elif ctx.store == GradStore.BACKWARD:
            ctx.save_for_backward(args.logits, args.labels, out.lse, out.coef)
        return out.loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return _logits_grad(ctx, grad_loss), None, None


class LinearTokenWeightedCEFunction(torch.autograd.Function):
    """The token-weighted cross-entropy of ``hidden @ weight.T + bias`` (``LinearCEArgs``),
    chunked over rows: for reductions to a scalar, forward computes the gradients of hidden,
    weight and bias and backward scales them in place; for ``"none"``, backward runs the chunks
    again with each row's ``grad_output`` in its coefficient."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, args: LinearCEArgs):
        ctx.reduction, ctx.want, ctx.backend = args.reduction, list(args.want), args.backend
        if args.reduction == "none":
            out = LinearCEOut._make(linear_ce_op(*args._replace(want=[False] * 3)))
            _stash(ctx, args)
        else:
            out = LinearCEOut._make(linear_ce_op(*args))
            _save_linear_grads(ctx, out, hidden)
        return out.loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.reduction != "none":
            return _wanted_grads(ctx, _scaled_linear_grads(ctx, grad_loss))
        args, _ = _unstash(ctx)
        return _wanted_grads(ctx, linear_ce_op(*args._replace(grad_output=grad_loss.reshape(-1)))[1:])
