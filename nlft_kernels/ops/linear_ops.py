"""The linear losses as ``torch.library`` ops (see ``ops/loss_ops.py``): ``nlft_linear_loss``
(forward: the chunked passes of ``ops/linear_chunks.py``, with the gradients of hidden, weight
and bias for reductions to a scalar), its backward for ``reduction="none"`` (a second chunked
pass with the per-row ``grad_output``) and ``linear_token_logprobs`` (no gradient)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from nlft_kernels.backends import resolve_backend
from nlft_kernels.ops.contracts import acc_dtype
from nlft_kernels.ops.inputs import BOOL_DETAILS, DETAIL_FIELDS, check_label_range, make_views
from nlft_kernels.ops.library import define
from nlft_kernels.ops.linear_chunks import (
    NLFTLinearLossParams,
    auto_chunk_rows,
    flat_rows_2d,
    linear_forward,
    linear_label_logprobs,
    linear_none_backward,
)
from nlft_kernels.ops.loss_ops import NLFTRuleFields, NLFTViewFields, config_of, schema_fields

# One ``nlft_linear_loss`` call: flat hidden [N, D], weight [V, D], bias [V] or None; the
# teacher views, labels, samples and constants as ``NLFTLossArgs`` (``NLFTViewFields``,
# ``NLFTRuleFields``); rows: per chunk (0: automatic, from free memory at run time); clusters:
# whether the clusters walk ``hidden``; steps: the rows of every sample in the [B, T] layout (T),
# 0 for flat rows with sample_ids (the chunk schedule then reads their lengths); want: which of
# the hidden, weight and bias gradients to compute.
NLFTLinearLossArgs = NamedTuple(
    "NLFTLinearLossArgs",
    [("hidden", Tensor), ("weight", Tensor), ("bias", Tensor | None), *schema_fields(NLFTViewFields)]
    + [*schema_fields(NLFTRuleFields), ("rows", int), ("clusters", bool), ("steps", int), ("want", list[bool])],
)


def head_fields(hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_size: int | None) -> dict[str, object]:
    """The head's fields of a linear loss op (``NLFTLinearLossArgs``, ``linear_ce.LinearCEArgs``)
    from the public function's arguments: hidden flattened to [N, D], hidden, weight and bias
    detached; rows: ``chunk_size`` (0: automatic); want: which of the three get a gradient."""
    train = torch.is_grad_enabled()
    return {
        "hidden": flat_rows_2d(hidden).detach(),
        "weight": weight.detach(),
        "bias": None if bias is None else bias.detach(),
        "rows": chunk_size or 0,
        "want": [train and t is not None and t.requires_grad for t in (hidden, weight, bias)],
    }


# loss; the gradients of hidden, weight, bias (empty where not wanted, and with "none"); the
# factor [N] of each row's provisional gradient; the per-token details.
NLFTLinearLossOut = NamedTuple(
    "NLFTLinearLossOut",
    [("loss", Tensor), ("grad_hidden", Tensor), ("grad_weight", Tensor), ("grad_bias", Tensor), ("factor", Tensor)]
    + [(name, Tensor) for name in DETAIL_FIELDS],
)


def linear_params(a: NLFTLinearLossArgs) -> NLFTLinearLossParams:
    """The chunk passes' parameters of a call (views without base logits: each chunk brings its own)."""
    cfg = config_of(a.rule, a.ignore_index, a.criterion)
    proxy = a.hidden.new_empty(()).expand(1, a.labels.numel(), a.weight.shape[0])
    views = make_views(
        proxy, a.standard, a.standard_mode, a.judge, a.judge_mode, a.labels, a.sample_ids, a.correct, cfg,
        a.reduction, acc_dtype(a.hidden.dtype), a.validate, a.weight.shape[0],
    )  # fmt: skip
    backend = resolve_backend(a.backend, a.hidden.device)
    rows = a.rows or auto_chunk_rows(a.hidden.shape[0], a.weight)
    return NLFTLinearLossParams(
        views, a.sample_ids, a.correct, cfg, a.reduction, backend, a.validate, rows, a.clusters, a.steps
    )


def _grads_or_empty(grads, a: NLFTLinearLossArgs) -> list[Tensor]:
    likes = (a.hidden, a.weight, a.weight)
    return [like.new_empty(0) if g is None else g for g, like in zip(grads, likes, strict=True)]


def _linear_impl(a: NLFTLinearLossArgs) -> NLFTLinearLossOut:
    result, grads = linear_forward(a.hidden, a.weight, a.bias, linear_params(a), tuple(a.want))
    details = [result.per_row[name] for name in DETAIL_FIELDS]
    return NLFTLinearLossOut(result.loss, *_grads_or_empty(grads, a), result.factor, *details)


def _fake_grads(a: NLFTLinearLossArgs, want) -> list[Tensor]:
    shapes = ((a.hidden, a.hidden.shape), (a.weight, a.weight.shape), (a.weight, a.weight.shape[:1]))
    return [like.new_empty(shape) if w else like.new_empty(0) for (like, shape), w in zip(shapes, want, strict=True)]


def _linear_fake(a: NLFTLinearLossArgs) -> NLFTLinearLossOut:
    acc, n = acc_dtype(a.hidden.dtype), a.labels.numel()
    want = a.want if a.reduction != "none" else (False,) * 3
    details = [a.hidden.new_empty(n, dtype=torch.bool if name in BOOL_DETAILS else acc) for name in DETAIL_FIELDS]
    return NLFTLinearLossOut(
        a.hidden.new_empty(n if a.reduction == "none" else (), dtype=acc),
        *_fake_grads(a, want),
        a.hidden.new_empty(n, dtype=acc),
        *details,
    )


nlft_linear_loss_op = define("nlft_linear_loss", NLFTLinearLossArgs, NLFTLinearLossOut, _linear_impl, _linear_fake)


class LinearGradsOut(NamedTuple):
    grad_hidden: Tensor
    grad_weight: Tensor
    grad_bias: Tensor


# The schema of the "none" backward: the forward's arguments, then the factor and grad_output.
LinearBackwardArgs = NamedTuple(
    "LinearBackwardArgs",
    [*schema_fields(NLFTLinearLossArgs), ("factor", Tensor), ("grad_output", Tensor)],
)


def _linear_backward_impl(a) -> LinearGradsOut:
    call = NLFTLinearLossArgs(*a[: len(NLFTLinearLossArgs._fields)])
    p = linear_params(call)
    grads = linear_none_backward(
        call.hidden, call.weight, call.bias, p.views, p.cfg, p.backend, p.rows, tuple(call.want), a.factor,
        a.grad_output,
    )  # fmt: skip
    return LinearGradsOut(*_grads_or_empty(grads, call))


def _linear_backward_fake(a) -> LinearGradsOut:
    call = NLFTLinearLossArgs(*a[: len(NLFTLinearLossArgs._fields)])
    return LinearGradsOut(*_fake_grads(call, call.want))


nlft_linear_loss_backward_op = define(
    "nlft_linear_loss_backward", LinearBackwardArgs, LinearGradsOut, _linear_backward_impl, _linear_backward_fake
)


class LinearTokenLogprobsArgs(NamedTuple):
    """hidden: [N, D]; weight: [V, D]; bias: [V] or None; labels: [N] int64; rows: per chunk (0:
    automatic)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    ignore_index: int
    rows: int
    backend: str
    validate: bool


class LogprobsOut(NamedTuple):
    logprobs: Tensor  # [N] ACC, 0 at ignore_index


def _linear_token_logprobs_impl(a: LinearTokenLogprobsArgs) -> LogprobsOut:
    if a.validate:
        check_label_range(a.labels, a.weight.shape[0], a.ignore_index)
    backend = resolve_backend(a.backend, a.hidden.device)
    rows = a.rows or auto_chunk_rows(a.labels.numel(), a.weight)
    out = linear_label_logprobs(a.hidden, a.weight, a.bias, a.labels, a.ignore_index, rows, backend)
    if a.validate and not bool(torch.isfinite(out).all()):
        raise ValueError(
            "the logits hidden @ weight.T (+ bias) are non-finite (NaN or inf) in a labelled row: "
            "check hidden, weight and bias"
        )
    return LogprobsOut(out)


linear_token_logprobs_op = define(
    "linear_token_logprobs",
    LinearTokenLogprobsArgs,
    LogprobsOut,
    _linear_token_logprobs_impl,
    lambda a: LogprobsOut(a.hidden.new_empty(a.labels.numel(), dtype=acc_dtype(a.hidden.dtype))),
)
