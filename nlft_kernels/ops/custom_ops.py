"""torch.library custom ops over the fused losses, so that ``torch.compile(fullgraph=True)`` traces them.

Each op wraps the eager forward of one autograd Function: the row kernel (Triton, the C++ or
CUDA kernel of ``nlft_kernels._C``, or chunked torch), the per-sample stage and, for the linear
loss, the chunk matmuls. Dynamo sees one opaque node with a fake implementation (output shapes
and dtypes, nothing computed) and an autograd formula (``register_autograd``). The
data-dependent parts (sample groups, the cluster walk, the rows the per-sample stage rescales)
run inside the op at run time, so they break no graph and need no guard.

The public functions (``nlft_loss``, ``nlft_linear_loss``, ``linear_token_logprobs``,
``token_logprobs``) take this route only while dynamo traces them
(``torch.compiler.is_compiling()``); eagerly they keep their autograd Functions. While
compiling, ``validate`` is off (its checks are host syncs: validate eagerly once), the backend
is resolved inside the op, and backward scales the stored gradients out of place (the eager
Functions scale them in place; a compiled graph owns its buffers).

The objective's constants cross the op boundary as plain scalars (``config_args``): a custom
op takes tensors, numbers, strings and lists of them, not an ``NLFTConfig``.
"""

from __future__ import annotations

import functools
from dataclasses import fields

import torch
from torch import Tensor

from nlft_kernels.backends import resolve_backend
from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.launch import grad_dtype
from nlft_kernels.ops.token_logprobs import acc_dtype

_NOT_FLOAT = ("ignore_index", "cluster_criterion")
_FLOAT_FIELDS = tuple(f.name for f in fields(NLFTConfig) if f.name not in _NOT_FLOAT)
# Bool details in DETAIL_FIELDS order (the others are in the accumulator dtype).
_BOOL_DETAILS = ("saliency", "unlikelihood", "cluster", "killed")


def config_args(cfg: NLFTConfig) -> tuple[list[float], int, str]:
    """``cfg`` as the ops take it: (its float constants in ``_FLOAT_FIELDS`` order, ignore_index,
    cluster_criterion)."""
    return [float(getattr(cfg, name)) for name in _FLOAT_FIELDS], int(cfg.ignore_index), cfg.cluster_criterion


@functools.lru_cache(maxsize=64)
def _config(floats: tuple[float, ...], ignore_index: int, criterion: str) -> NLFTConfig:
    return NLFTConfig(
        **dict(zip(_FLOAT_FIELDS, floats, strict=True)), ignore_index=ignore_index, cluster_criterion=criterion
    )


def _empty(like: Tensor) -> Tensor:
    """The placeholder of an output that is not computed (a gradient nobody wants)."""
    return like.new_empty(0)


def _fake_details(rows, acc: torch.dtype, device) -> list[Tensor]:
    from nlft_kernels.ops.nlft_loss import DETAIL_FIELDS

    return [
        torch.empty(rows, dtype=torch.bool if name in _BOOL_DETAILS else acc, device=device) for name in DETAIL_FIELDS
    ]


# ---------------------------------------------------------------------------------------------
# token_logprobs


@torch.library.custom_op("nlft_kernels::token_logprobs", mutates_args=())
def token_logprobs_op(logits: Tensor, labels: Tensor, ignore_index: int, backend: str) -> tuple[Tensor, Tensor]:
    """(log p(label) [N], lse [N]) of ``logits`` [B, T, V] or [N, V]; see ``TokenLogprobsFunction``."""
    from nlft_kernels.ops._common import as_3d
    from nlft_kernels.ops.token_logprobs import _forward_cpp, _forward_torch, _forward_triton

    backend = resolve_backend(backend, logits.device)
    forward = {"triton": _forward_triton, "cpp": _forward_cpp}.get(backend, _forward_torch)
    return forward(as_3d(logits, "logits"), labels.reshape(-1).contiguous(), ignore_index)


@token_logprobs_op.register_fake
def _(logits, labels, ignore_index, backend):
    lp = logits.new_empty(labels.numel(), dtype=acc_dtype(logits.dtype))
    return lp, torch.empty_like(lp)


@torch.library.custom_op("nlft_kernels::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(
    logits: Tensor, labels: Tensor, lse: Tensor, grad_lp: Tensor, ignore_index: int, backend: str
) -> Tensor:
    """The gradient of ``logits`` for the upstream ``grad_lp`` [N]."""
    from nlft_kernels.ops._common import as_3d
    from nlft_kernels.ops.token_logprobs import _backward_torch, _backward_triton

    backend = resolve_backend(backend, logits.device)
    backward = _backward_triton if backend == "triton" else _backward_torch
    grad = backward(as_3d(logits, "logits"), labels.reshape(-1).contiguous(), lse, grad_lp.reshape(-1), ignore_index)
    return grad.reshape(logits.shape)


@token_logprobs_backward_op.register_fake
def _(logits, labels, lse, grad_lp, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _token_logprobs_setup(ctx, inputs, output):
    logits, labels, ignore_index, backend = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index, ctx.backend = ignore_index, backend


def _token_logprobs_backward(ctx, grad_lp, _grad_lse):
    logits, labels, lse = ctx.saved_tensors
    grad = token_logprobs_backward_op(logits, labels, lse, grad_lp, ctx.ignore_index, ctx.backend)
    return grad, None, None, None


token_logprobs_op.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


def token_logprobs_apply(logits: Tensor, labels: Tensor, ignore_index: int, backend: str) -> Tensor:
    """``TokenLogprobsFunction.apply`` through the custom op."""
    lp, _ = token_logprobs_op(logits, labels, ignore_index, backend)
    return lp.view(labels.shape)


# ---------------------------------------------------------------------------------------------
# nlft_loss


@torch.library.custom_op("nlft_kernels::nlft_loss", mutates_args=())
def nlft_loss_op(
    base: Tensor,
    standard: Tensor,
    standard_mode: int,
    judge: Tensor | None,
    judge_mode: int,
    labels: Tensor,
    wrong: Tensor,
    scale: Tensor,
    sample_ids: Tensor,
    correct: Tensor,
    hidden: Tensor | None,
    floats: list[float],
    ignore_index: int,
    criterion: str,
    reduction: str,
    backend: str,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, gradient of ``base`` [B, T, V] or an empty tensor, the 9 details [N]): the forward of
    ``NLFTLossFunction`` on ``base`` [B, T, V] (``as_3d``) and the teacher views as in ``Views``."""
    from nlft_kernels.ops.nlft_loss import (
        DETAIL_FIELDS,
        VIEW_NONE,
        Views,
        first_stage,
        rescale_rows,
        second_stage,
    )

    cfg = _config(tuple(floats), ignore_index, criterion)
    if judge_mode == VIEW_NONE and bool((~correct[sample_ids]).any()):
        raise ValueError("judge is required when any sample is wrong (correct has False entries)")
    backend = resolve_backend(backend, base.device, labels.numel(), base.shape[-1])
    views = Views(base, standard, standard_mode, judge, judge_mode, labels, wrong, scale)
    stats, saliency, grad = first_stage(views, cfg, backend, compute_grad)
    flat_hidden = None if hidden is None else hidden.reshape(saliency.numel(), -1)
    stage = second_stage(stats, saliency, views, sample_ids, correct, flat_hidden, cfg, reduction, False)
    if grad is not None and stage.rows.numel():
        rescale_rows(grad, stage.factor, stage.rows, backend)
    # Outputs of a custom op may not alias each other (the log-probs are rows of one tensor).
    details = [stage.per_row[name].clone() for name in DETAIL_FIELDS]
    return (stage.loss.clone(), _empty(base) if grad is None else grad, *details)


@nlft_loss_op.register_fake
def _(base, standard, standard_mode, judge, judge_mode, labels, wrong, scale, sample_ids, correct, hidden, floats,
      ignore_index, criterion, reduction, backend, compute_grad):  # fmt: skip
    acc, rows = acc_dtype(base.dtype), labels.numel()
    loss = base.new_empty(rows if reduction == "none" else (), dtype=acc)
    grad = base.new_empty(base.shape, dtype=grad_dtype(base.dtype)) if compute_grad else _empty(base)
    return (loss, grad, *_fake_details(rows, acc, base.device))


def _nlft_loss_setup(ctx, inputs, output):
    ctx.reduction, ctx.compute_grad = inputs[14], inputs[16]
    ctx.save_for_backward(output[1])


def _scaled(grad: Tensor, grad_loss: Tensor, reduction: str) -> Tensor:
    """``grad`` times the upstream gradient (per row for ``"none"``), out of place, in grad's dtype."""
    if reduction == "none":
        rows = grad.reshape(grad_loss.numel(), -1)
        return (rows * grad_loss.reshape(-1, 1)).to(grad.dtype).reshape(grad.shape)
    return (grad * grad_loss).to(grad.dtype)


def _nlft_loss_backward(ctx, grad_loss, *_grad_rest):
    (grad,) = ctx.saved_tensors
    base_grad = _scaled(grad, grad_loss, ctx.reduction) if ctx.compute_grad else None
    return (base_grad,) + (None,) * 16


nlft_loss_op.register_autograd(_nlft_loss_backward, setup_context=_nlft_loss_setup)


def nlft_loss_apply(
    base_logits, views, sample_ids, correct, hidden_states, config, reduction, backend, validate, grad_on
):
    """``NLFTLossFunction.apply`` (same arguments) through the custom op; ``validate`` is off."""
    floats, ignore_index, criterion = config_args(config)
    compute_grad = grad_on and base_logits.requires_grad
    loss, _grad, *details = nlft_loss_op(
        views.base,
        views.standard,
        views.standard_mode,
        views.judge,
        views.judge_mode,
        views.labels,
        views.wrong,
        views.scale,
        sample_ids,
        correct,
        None if hidden_states is None else hidden_states.detach(),
        floats,
        ignore_index,
        criterion,
        reduction,
        backend,
        compute_grad,
    )
    return (loss, *details)


# ---------------------------------------------------------------------------------------------
# nlft_linear_loss and linear_token_logprobs


def _linear_views(standard, standard_mode, judge, judge_mode, labels, wrong, scale):
    from nlft_kernels.ops.nlft_loss import Views

    return Views(None, standard, standard_mode, judge, judge_mode, labels, wrong, scale)


def _auto_rows(rows: int, hidden: Tensor, weight: Tensor) -> int:
    """``rows`` per chunk, or the automatic choice of ``nlft_linear_loss`` when it is 0."""
    from nlft_kernels.ops.nlft_linear_loss import _acc_size, chunk_rows_for

    return rows or chunk_rows_for(
        hidden.shape[0], weight.shape[0], _acc_size(weight), hidden.device, dim=weight.shape[1]
    )


@torch.library.custom_op("nlft_kernels::nlft_linear_loss", mutates_args=())
def nlft_linear_loss_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    standard: Tensor,
    standard_mode: int,
    judge: Tensor | None,
    judge_mode: int,
    labels: Tensor,
    wrong: Tensor,
    scale: Tensor,
    sample_ids: Tensor,
    correct: Tensor,
    floats: list[float],
    ignore_index: int,
    criterion: str,
    reduction: str,
    backend: str,
    rows: int,
    clusters: bool,
    want: list[bool],
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor
]:
    """(loss, gradients of hidden [N, D], weight [V, D], bias [V] (empty where not in ``want`` or
    with ``"none"``), the factor [N] of each row's provisional gradient, the 9 details [N]): the
    forward of ``NLFTLinearLossFunction`` on flat ``hidden`` [N, D]; ``rows`` 0 picks the chunk."""
    from nlft_kernels.ops.nlft_linear_loss import _forward_pass, _Grads, _Head
    from nlft_kernels.ops.nlft_loss import DETAIL_FIELDS, VIEW_NONE

    cfg = _config(tuple(floats), ignore_index, criterion)
    if judge_mode == VIEW_NONE and bool((~correct[sample_ids]).any()):
        raise ValueError("judge is required when any sample is wrong (correct has False entries)")
    backend = resolve_backend(backend, hidden.device)
    views = _linear_views(standard, standard_mode, judge, judge_mode, labels, wrong, scale)
    grads = _Grads(hidden, weight, bias, tuple(want)) if any(want) and reduction != "none" else None
    with torch.autocast(hidden.device.type, enabled=False):
        result = _forward_pass(
            hidden,
            _Head.of(weight, bias),
            views,
            sample_ids,
            correct,
            cfg,
            reduction,
            backend,
            False,
            _auto_rows(rows, hidden, weight),
            clusters,
            grads,
        )
    out_grads = [_empty(hidden) for _ in range(3)]
    if grads is not None:
        out_grads = [
            _empty(hidden) if grads.hidden is None else grads.hidden,
            _empty(weight) if grads.weight is None else grads.weight.to(weight.dtype),
            _empty(weight) if grads.bias is None else grads.bias.to(bias.dtype),
        ]
    details = [result.per_row[name] for name in DETAIL_FIELDS]
    return (result.loss, *out_grads, result.factor, *details)


@nlft_linear_loss_op.register_fake
def _(hidden, weight, bias, standard, standard_mode, judge, judge_mode, labels, wrong, scale, sample_ids, correct,
      floats, ignore_index, criterion, reduction, backend, rows, clusters, want):  # fmt: skip
    acc, n = acc_dtype(hidden.dtype), labels.numel()
    loss = hidden.new_empty(n if reduction == "none" else (), dtype=acc)
    scalar = reduction != "none"
    grads = [
        hidden.new_empty(hidden.shape) if scalar and want[0] else _empty(hidden),
        weight.new_empty(weight.shape) if scalar and want[1] else _empty(weight),
        weight.new_empty(weight.shape[0]) if scalar and want[2] else _empty(weight),
    ]
    return (loss, *grads, hidden.new_empty(n, dtype=acc), *_fake_details(n, acc, hidden.device))


@torch.library.custom_op("nlft_kernels::nlft_linear_loss_backward", mutates_args=())
def nlft_linear_loss_backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    standard: Tensor,
    standard_mode: int,
    judge: Tensor | None,
    judge_mode: int,
    labels: Tensor,
    wrong: Tensor,
    scale: Tensor,
    factor: Tensor,
    grad_loss: Tensor,
    floats: list[float],
    ignore_index: int,
    criterion: str,
    backend: str,
    rows: int,
    want: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients (hidden, weight, bias; empty where not in ``want``) of ``reduction="none"``
    for the per-row upstream ``grad_loss`` [N]: a second chunked pass, as the eager backward."""
    from nlft_kernels.ops.nlft_linear_loss import _backward_pass, _Grads, _Head

    cfg = _config(tuple(floats), ignore_index, criterion)
    backend = resolve_backend(backend, hidden.device)
    views = _linear_views(standard, standard_mode, judge, judge_mode, labels, wrong, scale)
    grads = _Grads(hidden, weight, bias, tuple(want))
    row_factor = factor * grad_loss.reshape(-1).to(factor.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        head = _Head.of(weight, bias)
        _backward_pass(hidden, head, views, cfg, backend, _auto_rows(rows, hidden, weight), grads, row_factor)
    return (
        _empty(hidden) if grads.hidden is None else grads.hidden,
        _empty(weight) if grads.weight is None else grads.weight.to(weight.dtype),
        _empty(weight) if grads.bias is None else grads.bias.to(bias.dtype),
    )


@nlft_linear_loss_backward_op.register_fake
def _(hidden, weight, bias, standard, standard_mode, judge, judge_mode, labels, wrong, scale, factor, grad_loss,
      floats, ignore_index, criterion, backend, rows, want):  # fmt: skip
    return (
        hidden.new_empty(hidden.shape) if want[0] else _empty(hidden),
        weight.new_empty(weight.shape) if want[1] else _empty(weight),
        weight.new_empty(weight.shape[0]) if want[2] else _empty(weight),
    )


def _linear_setup(ctx, inputs, output):
    (hidden, weight, bias, standard, standard_mode, judge, judge_mode, labels, wrong, scale, _sample_ids, _correct,
     floats, ignore_index, criterion, reduction, backend, rows, _clusters, want) = inputs  # fmt: skip
    ctx.reduction, ctx.want = reduction, tuple(want)
    if reduction == "none":
        ctx.args = (standard_mode, judge_mode, floats, ignore_index, criterion, backend, rows)
        ctx.has_judge, ctx.has_bias = judge is not None, bias is not None
        ctx.save_for_backward(hidden, weight, bias, standard, judge, labels, wrong, scale, output[4])
    else:
        ctx.save_for_backward(*output[1:4])


def _linear_backward(ctx, grad_loss, *_grad_rest):
    none = (None,) * 17
    if ctx.reduction != "none":
        grads = [
            _scaled(grad, grad_loss, ctx.reduction) if want else None
            for grad, want in zip(ctx.saved_tensors, ctx.want, strict=True)
        ]
        return (*grads, *none)
    hidden, weight, bias, standard, judge, labels, wrong, scale, factor = ctx.saved_tensors
    standard_mode, judge_mode, floats, ignore_index, criterion, backend, rows = ctx.args
    grads = nlft_linear_loss_backward_op(
        hidden,
        weight,
        bias if ctx.has_bias else None,
        standard,
        standard_mode,
        judge if ctx.has_judge else None,
        judge_mode,
        labels,
        wrong,
        scale,
        factor,
        grad_loss,
        floats,
        ignore_index,
        criterion,
        backend,
        rows,
        list(ctx.want),
    )
    return (*[g if want else None for g, want in zip(grads, ctx.want, strict=True)], *none)


nlft_linear_loss_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def nlft_linear_loss_apply(
    hidden, weight, bias, views, sample_ids, correct, cfg, reduction, backend, validate, rows, clusters, train
):
    """``NLFTLinearLossFunction.apply`` (same arguments; ``rows`` 0 for automatic) through the
    custom op; ``validate`` is off."""
    floats, ignore_index, criterion = config_args(cfg)
    want = [
        train and hidden.requires_grad,
        train and weight.requires_grad,
        train and bias is not None and bias.requires_grad,
    ]
    loss, _gh, _gw, _gb, _factor, *details = nlft_linear_loss_op(
        hidden,
        weight,
        bias,
        views.standard,
        views.standard_mode,
        views.judge,
        views.judge_mode,
        views.labels,
        views.wrong,
        views.scale,
        sample_ids,
        correct,
        floats,
        ignore_index,
        criterion,
        reduction,
        backend,
        rows,
        clusters,
        want,
    )
    return (loss, *details)


@torch.library.custom_op("nlft_kernels::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int, rows: int, backend: str
) -> Tensor:
    """[N] label log-probs of flat ``hidden`` [N, D] under the head (no gradient), chunked by ``rows``
    (0: automatic); the loop of ``linear_token_logprobs``."""
    from nlft_kernels.ops.nlft_linear_loss import _Head
    from nlft_kernels.ops.token_logprobs import token_logprobs

    backend = resolve_backend(backend, hidden.device)
    n = labels.numel()
    rows = _auto_rows(rows, hidden, weight)
    out = torch.empty(n, dtype=acc_dtype(hidden.dtype), device=hidden.device)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        head = _Head.of(weight, bias)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            out[start:stop] = token_logprobs(
                head.logits(hidden[start:stop]), labels[start:stop], ignore_index, backend, validate=False
            )
    return out


@linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, rows, backend):
    return hidden.new_empty(labels.numel(), dtype=acc_dtype(hidden.dtype))
