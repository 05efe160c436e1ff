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
op takes tensors, numbers, strings and lists of them, not an ``NLFTConfig``. Inside, each op
runs the same code as its Function: ``stages.nlft_stages`` and the passes of
``linear_chunks``, through the backend registry. (The compiled kernels of ``_C`` are ops of
their own: ``ops/extension_ops.py``.)
"""

from __future__ import annotations

import functools
from dataclasses import fields

import torch
from torch import Tensor

from nlft_kernels.backends import implementation, resolve_backend
from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.contracts import ViewMode, acc_dtype
from nlft_kernels.ops.inputs import BOOL_DETAILS, DETAIL_FIELDS, Views, as_3d
from nlft_kernels.ops.launch import grad_dtype
from nlft_kernels.ops.linear_chunks import (
    NLFTLinearLossParams,
    auto_chunk_rows,
    linear_forward,
    linear_label_logprobs,
    linear_none_backward,
)
from nlft_kernels.ops.stages import NLFTLossParams, nlft_stages

_NOT_FLOAT = ("ignore_index", "cluster_criterion")
_FLOAT_FIELDS = tuple(f.name for f in fields(NLFTConfig) if f.name not in _NOT_FLOAT)


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


def _or_empty(grads, hidden: Tensor, weight: Tensor) -> list[Tensor]:
    """(hidden, weight, bias) gradients with an empty placeholder where one is None (a custom op
    returns no None)."""
    likes = (hidden, weight, weight)
    return [_empty(like) if g is None else g for g, like in zip(grads, likes, strict=True)]


def _fake_details(rows, acc: torch.dtype, device) -> list[Tensor]:
    return [
        torch.empty(rows, dtype=torch.bool if name in BOOL_DETAILS else acc, device=device) for name in DETAIL_FIELDS
    ]


def _fake_grads(hidden: Tensor, weight: Tensor, want) -> list[Tensor]:
    """The fake (hidden, weight, bias) gradients: shaped like them where wanted, else empty."""
    likes = ((hidden, hidden.shape), (weight, weight.shape), (weight, weight.shape[:1]))
    return [like.new_empty(shape) if w else _empty(like) for (like, shape), w in zip(likes, want, strict=True)]


def _require_judge(judge_mode: int, correct: Tensor, sample_ids: Tensor) -> None:
    """The check the public functions skip while compiling: a judge view for wrong samples."""
    if judge_mode == ViewMode.NONE and bool((~correct[sample_ids]).any()):
        raise ValueError("judge is required when any sample is wrong (correct has False entries)")


def _scaled(grad: Tensor, grad_loss: Tensor, reduction: str) -> Tensor:
    """``grad`` times the upstream gradient (per row for ``"none"``), out of place, in grad's dtype."""
    if reduction == "none":
        rows = grad.reshape(grad_loss.numel(), -1)
        return (rows * grad_loss.reshape(-1, 1)).to(grad.dtype).reshape(grad.shape)
    return (grad * grad_loss).to(grad.dtype)


# ---------------------------------------------------------------------------------------------
# token_logprobs


@torch.library.custom_op("nlft_kernels::token_logprobs", mutates_args=())
def token_logprobs_op(logits: Tensor, labels: Tensor, ignore_index: int, backend: str) -> tuple[Tensor, Tensor]:
    """(log p(label) [N], lse [N]) of ``logits`` [B, T, V] or [N, V]; see ``TokenLogprobsFunction``."""
    backend = resolve_backend(backend, logits.device)
    labels = labels.reshape(-1).contiguous()
    return implementation(backend).label_logprobs(as_3d(logits, "logits"), labels, ignore_index)


@token_logprobs_op.register_fake
def _(logits, labels, ignore_index, backend):
    lp = logits.new_empty(labels.numel(), dtype=acc_dtype(logits.dtype))
    return lp, torch.empty_like(lp)


@torch.library.custom_op("nlft_kernels::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(
    logits: Tensor, labels: Tensor, lse: Tensor, grad_lp: Tensor, ignore_index: int, backend: str
) -> Tensor:
    """The gradient of ``logits`` for the upstream ``grad_lp`` [N]."""
    backward = implementation(resolve_backend(backend, logits.device)).label_logprobs_backward
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
    """``token_logprobs`` through the custom op: log-probs shaped like ``labels``."""
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
    cfg = _config(tuple(floats), ignore_index, criterion)
    _require_judge(judge_mode, correct, sample_ids)
    backend = resolve_backend(backend, base.device, labels.numel(), base.shape[-1])
    views = Views(base, standard, standard_mode, judge, judge_mode, labels, wrong, scale)
    params = NLFTLossParams(views, sample_ids, correct, hidden, cfg, reduction, backend, False, compute_grad)
    stage, grad = nlft_stages(params, compute_grad)
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


def _nlft_loss_backward(ctx, grad_loss, *_grad_rest):
    (grad,) = ctx.saved_tensors
    base_grad = _scaled(grad, grad_loss, ctx.reduction) if ctx.compute_grad else None
    return (base_grad,) + (None,) * 16


nlft_loss_op.register_autograd(_nlft_loss_backward, setup_context=_nlft_loss_setup)


def nlft_loss_apply(base_logits: Tensor, p) -> tuple[Tensor, ...]:
    """``NLFTLossFunction.apply(base_logits, p)`` (``p``: its ``NLFTLossParams``) through the
    custom op; ``validate`` is off."""
    floats, ignore_index, criterion = config_args(p.cfg)
    v = p.views
    loss, _grad, *details = nlft_loss_op(
        v.base, v.standard, int(v.standard_mode), v.judge, int(v.judge_mode), v.labels, v.wrong, v.scale,
        p.sample_ids, p.correct, None if p.hidden_states is None else p.hidden_states.detach(), floats,
        ignore_index, criterion, p.reduction, p.backend, p.grad_on and base_logits.requires_grad,
    )  # fmt: skip
    return (loss, *details)


# ---------------------------------------------------------------------------------------------
# nlft_linear_loss and linear_token_logprobs


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
    cfg = _config(tuple(floats), ignore_index, criterion)
    _require_judge(judge_mode, correct, sample_ids)
    backend = resolve_backend(backend, hidden.device)
    views = Views(None, standard, standard_mode, judge, judge_mode, labels, wrong, scale)
    rows = rows or auto_chunk_rows(hidden.shape[0], weight)
    params = NLFTLinearLossParams(views, sample_ids, correct, cfg, reduction, backend, False, rows, clusters, True)
    result, grads = linear_forward(hidden, weight, bias, params, tuple(want))
    details = [result.per_row[name] for name in DETAIL_FIELDS]
    return (result.loss, *_or_empty(grads, hidden, weight), result.factor, *details)


@nlft_linear_loss_op.register_fake
def _(hidden, weight, bias, standard, standard_mode, judge, judge_mode, labels, wrong, scale, sample_ids, correct,
      floats, ignore_index, criterion, reduction, backend, rows, clusters, want):  # fmt: skip
    acc, n = acc_dtype(hidden.dtype), labels.numel()
    loss = hidden.new_empty(n if reduction == "none" else (), dtype=acc)
    grads = _fake_grads(hidden, weight, want if reduction != "none" else (False,) * 3)
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
    cfg = _config(tuple(floats), ignore_index, criterion)
    backend = resolve_backend(backend, hidden.device)
    views = Views(None, standard, standard_mode, judge, judge_mode, labels, wrong, scale)
    grads = linear_none_backward(
        hidden, weight, bias, views, cfg, backend, rows or auto_chunk_rows(hidden.shape[0], weight), tuple(want),
        factor, grad_loss,
    )  # fmt: skip
    return tuple(_or_empty(grads, hidden, weight))


@nlft_linear_loss_backward_op.register_fake
def _(hidden, weight, bias, standard, standard_mode, judge, judge_mode, labels, wrong, scale, factor, grad_loss,
      floats, ignore_index, criterion, backend, rows, want):  # fmt: skip
    return tuple(_fake_grads(hidden, weight, want))


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
        hidden, weight, bias if ctx.has_bias else None, standard, standard_mode, judge if ctx.has_judge else None,
        judge_mode, labels, wrong, scale, factor, grad_loss, floats, ignore_index, criterion, backend, rows,
        list(ctx.want),
    )  # fmt: skip
    return (*[g if want else None for g, want in zip(grads, ctx.want, strict=True)], *none)


nlft_linear_loss_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def nlft_linear_loss_apply(hidden: Tensor, weight: Tensor, bias: Tensor | None, p) -> tuple[Tensor, ...]:
    """``NLFTLinearLossFunction.apply(hidden, weight, bias, p)`` (``p``: its
    ``NLFTLinearLossParams``; ``rows`` 0 for automatic) through the custom op; ``validate`` is off."""
    floats, ignore_index, criterion = config_args(p.cfg)
    want = [p.train and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    v = p.views
    loss, _gh, _gw, _gb, _factor, *details = nlft_linear_loss_op(
        hidden, weight, bias, v.standard, int(v.standard_mode), v.judge, int(v.judge_mode), v.labels, v.wrong,
        v.scale, p.sample_ids, p.correct, floats, ignore_index, criterion, p.reduction, p.backend, p.rows,
        p.clusters, want,
    )  # fmt: skip
    return (loss, *details)


@torch.library.custom_op("nlft_kernels::linear_token_logprobs", mutates_args=())
def linear_token_logprobs_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int, rows: int, backend: str
) -> Tensor:
    """[N] label log-probs of flat ``hidden`` [N, D] under the head (no gradient), chunked by ``rows``
    (0: automatic); the loop of ``linear_token_logprobs``."""
    backend = resolve_backend(backend, hidden.device)
    rows = rows or auto_chunk_rows(labels.numel(), weight)
    return linear_label_logprobs(hidden, weight, bias, labels, ignore_index, rows, backend)


@linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, rows, backend):
    return hidden.new_empty(labels.numel(), dtype=acc_dtype(hidden.dtype))
