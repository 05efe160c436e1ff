"""The losses as ``torch.library`` ops (namespace ``nlft_kernels``, declared by ``ops/library.py``).

Per loss, one forward op computes everything the loss needs from its inputs (the row pass of a
backend, the per-sample stage, for the linear loss the chunk matmuls): ``torch.compile`` sees
one opaque node with a fake implementation, and the data-dependent parts (sample groups, the
cluster walk, ``validate``'s checks) run inside it at run time, eagerly and compiled alike. The
gradient passes of backward are two more ops:

- ``scale_grad_``: a gradient stored in forward (``GradStore.FORWARD``) times each row's factor
  (the per-sample fix-up) and ``grad_output``, in place, in one pass that skips rows whose total
  factor is 1 (on the device: no host sync, no ``mul_`` over [N, V]);
- ``softmax_grad`` / ``softmax_grad_``: ``grad_output * coef * (softmax - onehot)`` from the saved
  lse (``GradStore.BACKWARD``), into a new buffer or into the logits themselves.

``nlft_loss_`` is ``nlft_loss`` writing the gradient into the base logits (``inplace_grad``).
The autograd formula of every loss is one ``torch.autograd.Function`` (``ops/autograd.py``).
Each op's arguments are a NamedTuple below, built by keyword in one place (the public
function) and read by name in the implementation.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import fields
from typing import NamedTuple

import torch
from torch import Tensor

from nlft_kernels.backends import implementation, resolve_backend
from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.contracts import GradStore, acc_dtype
from nlft_kernels.ops.inputs import BOOL_DETAILS, DETAIL_FIELDS, check_label_range, make_views
from nlft_kernels.ops.launch import grad_dtype
from nlft_kernels.ops.library import define
from nlft_kernels.ops.stages import first_stage, second_stage
from nlft_kernels.ops.vocab_parallel import first_stage_vocab_parallel, shard_labels

_NOT_FLOAT = ("ignore_index", "cluster_criterion")
_FLOAT_FIELDS = tuple(f.name for f in fields(NLFTConfig) if f.name not in _NOT_FLOAT)


def config_args(cfg: NLFTConfig) -> tuple[list[float], int, str]:
    """``cfg`` as the ops take it: (its float constants in ``_FLOAT_FIELDS`` order, ignore_index,
    cluster_criterion); a custom op takes numbers and strings, not an ``NLFTConfig``."""
    return [float(getattr(cfg, name)) for name in _FLOAT_FIELDS], int(cfg.ignore_index), cfg.cluster_criterion


@functools.lru_cache(maxsize=64)
def _config(floats: tuple[float, ...], ignore_index: int, criterion: str) -> NLFTConfig:
    return NLFTConfig(
        **dict(zip(_FLOAT_FIELDS, floats, strict=True)), ignore_index=ignore_index, cluster_criterion=criterion
    )


def schema_fields(group: type) -> list[tuple[str, object]]:
    """The (name, type) fields of the NamedTuple ``group``, in order: a run of fields that several
    ops' argument tuples share, spliced into each (``NamedTuple(name, [..., *schema_fields(g), ...])``)."""
    return list(typing.get_type_hints(group).items())


def config_of(rule: list[float], ignore_index: int, criterion: str) -> NLFTConfig:
    return _config(tuple(rule), ignore_index, criterion)


def _empty(like: Tensor) -> Tensor:
    """The placeholder of an output that is not computed (an op returns no None)."""
    return like.new_empty(0)


def bump_version(t: Tensor) -> None:
    """Record that a kernel wrote ``t`` through its pointer (autograd cannot see it): a saved
    reference to the old values then raises instead of silently reading the new ones."""
    torch.autograd.graph.increment_version(t)


# ---------------------------------------------------------------------------------------------
# The gradient passes of backward


class ScaleArgs(NamedTuple):
    """grad: a stored gradient, contiguous [..., V], scaled in place row by row (rows of
    ``grad.view(-1, V)``); factor: [R] per row or [] for all, the factor still to apply times
    ``grad_output`` ([] or [R]); backend: a name."""

    grad: Tensor
    factor: Tensor
    grad_output: Tensor
    backend: str


def _scale_impl(a: ScaleArgs) -> None:
    rows = a.grad.view(-1, a.grad.shape[-1])
    acc = acc_dtype(a.grad.dtype)
    grad_output = a.grad_output.reshape(-1).to(acc)
    total = (a.factor.to(acc) * grad_output).expand(rows.shape[0])
    implementation(resolve_backend(a.backend, a.grad.device)).scale_rows(rows, total)
    # The buffer now holds the gradient for this grad_output: a second backward through the same
    # forward (retain_graph=True, gradcheck) finds the factor that turns it into its own, 1 / this
    # one (NaN where grad_output was 0: the values are gone). No version bump: the buffer is this
    # loss's own, and its saved references stay usable.
    undo = torch.where(grad_output != 0, 1.0 / grad_output, float("nan"))
    a.factor.data.copy_(undo.expand(a.factor.numel()).view(a.factor.shape))


scale_grad_op = define("scale_grad_", ScaleArgs, None, _scale_impl, lambda a: None, mutates=("grad", "factor"))


class SoftmaxGradArgs(NamedTuple):
    """logits: [B, T, V] (unit stride over V); labels: [N] int64 (global ids); lse: [N] ACC;
    coef: [N] ACC; grad_output: [] or [N]; offset: the first vocabulary id of these logits (a
    vocabulary-parallel shard's), labels outside the columns get no one-hot."""

    logits: Tensor
    labels: Tensor
    lse: Tensor
    coef: Tensor
    grad_output: Tensor
    ignore_index: int
    offset: int
    backend: str


class GradOut(NamedTuple):
    grad: Tensor


def _softmax_grad_into(a: SoftmaxGradArgs, out: Tensor) -> Tensor:
    x = a.logits
    backend = resolve_backend(a.backend, x.device, a.labels.numel(), x.shape[-1])
    labels = shard_labels(a.labels, a.offset, x.shape[-1], a.ignore_index) if a.offset else a.labels
    coef = a.coef * a.grad_output.reshape(-1).to(a.coef.dtype)
    return implementation(backend).softmax_grad(x, labels, a.lse, coef, a.ignore_index, out)


def _softmax_grad_impl(a: SoftmaxGradArgs) -> GradOut:
    out = torch.empty(a.logits.shape, dtype=a.logits.dtype, device=a.logits.device)
    return GradOut(_softmax_grad_into(a, out))


def _softmax_grad_inplace_impl(a: SoftmaxGradArgs) -> None:
    _softmax_grad_into(a, a.logits)
    bump_version(a.logits)


def _softmax_grad_fake(a: SoftmaxGradArgs) -> GradOut:
    return GradOut(torch.empty(a.logits.shape, dtype=a.logits.dtype, device=a.logits.device))


softmax_grad_op = define("softmax_grad", SoftmaxGradArgs, GradOut, _softmax_grad_impl, _softmax_grad_fake)
softmax_grad_inplace_op = define(
    "softmax_grad_", SoftmaxGradArgs, None, _softmax_grad_inplace_impl, lambda a: None, mutates=("logits",)
)


# ---------------------------------------------------------------------------------------------
# nlft_loss


class NLFTViewFields(NamedTuple):
    """The teacher views and rows of both NLFT ops (``NLFTLossArgs``,
    ``linear_ops.NLFTLinearLossArgs``), in their schemas' order: standard, judge: [B, T, V]
    logits or [N] label log-probs (the caller's dtype), judge None with mode NONE; labels,
    sample_ids: [N] int64; correct: [S] bool."""

    standard: Tensor
    standard_mode: int
    judge: Tensor | None
    judge_mode: int
    labels: Tensor
    sample_ids: Tensor
    correct: Tensor


class NLFTRuleFields(NamedTuple):
    """The constants and switches of both NLFT ops, in their schemas' order: rule, ignore_index,
    criterion: ``config_args``; reduction, backend (a name), validate: the public function's."""

    rule: list[float]
    ignore_index: int
    criterion: str
    reduction: str
    backend: str
    validate: bool


# One ``nlft_loss`` call. base: [B, T, V] logits (unit stride over V); the ``NLFTViewFields``;
# hidden: [N, D] or None (clusters); the ``NLFTRuleFields``; grad: a ``GradStore``; vocab: the
# vocabulary the labels index; group, offset: the vocabulary-parallel process group's name (""
# for none) and the first vocabulary id of this rank's columns.
NLFTLossArgs = NamedTuple(
    "NLFTLossArgs",
    [("base", Tensor), *schema_fields(NLFTViewFields), ("hidden", Tensor | None), *schema_fields(NLFTRuleFields)]
    + [("grad", int), ("vocab", int), ("group", str), ("offset", int)],
)


# loss: reduced (or [N] for "none"); grad: the stored gradient (FORWARD into a new buffer) or
# empty; grad_factor: [N], the per-row factor of the stored gradient (FORWARD) or each row's
# gradient coefficient (BACKWARD); lse: [N] of the base logits (BACKWARD) or empty; then the
# per-token details (``NLFTDetails``'s fields).
NLFTLossOut = NamedTuple(
    "NLFTLossOut",
    [("loss", Tensor), ("grad", Tensor), ("grad_factor", Tensor), ("lse", Tensor)]
    + [(name, Tensor) for name in DETAIL_FIELDS],
)


def base_lse(base: Tensor, labels: Tensor, lp_b: Tensor, ignore_index: int) -> Tensor:
    """lse [N] of the base rows from their label log-probs: ``x[label] - log p(label)`` (N entries
    read, not the rows); 0 at padding."""
    rows = torch.arange(labels.numel(), device=labels.device)
    steps, vocab = base.shape[1], base.shape[2]
    safe = torch.where((labels >= 0) & (labels < vocab), labels, 0)
    picked = base[rows // steps, rows % steps, safe].to(lp_b.dtype)
    return torch.where(labels != ignore_index, picked - lp_b, 0.0)


def _nlft_loss(a: NLFTLossArgs, inplace: bool) -> NLFTLossOut:
    cfg = config_of(a.rule, a.ignore_index, a.criterion)
    base = a.base
    acc = acc_dtype(base.dtype)
    views = make_views(
        base, a.standard, a.standard_mode, a.judge, a.judge_mode, a.labels, a.sample_ids, a.correct, cfg,
        a.reduction, acc, a.validate, a.vocab,
    )  # fmt: skip
    store = GradStore(a.grad)
    backend = resolve_backend(a.backend, base.device, a.labels.numel(), base.shape[-1])
    grad = None
    if a.group:
        stats, saliency, lse = first_stage_vocab_parallel(views, cfg, backend, a.group, a.offset)
    else:
        out = base if inplace else None
        stats, saliency, grad = first_stage(views, cfg, backend, store == GradStore.FORWARD, out)
        lse = base_lse(base, a.labels, stats[0], cfg.ignore_index) if store == GradStore.BACKWARD else None
    stage = second_stage(
        stats, saliency, views, a.sample_ids, a.correct, a.hidden, cfg, a.reduction, a.validate, backend
    )
    if inplace:
        bump_version(base)
    # Outputs of an op may not alias each other: the three log-probs are rows of ``stats``.
    details = [stage.per_row[name].clone() if name.startswith("logprob") else stage.per_row[name]
               for name in DETAIL_FIELDS]  # fmt: skip
    return NLFTLossOut(
        stage.loss,
        grad if grad is not None and not inplace else _empty(base),
        stage.factor if store == GradStore.FORWARD else stage.coef,
        _empty(stage.coef) if lse is None else lse,
        *details,
    )


def _nlft_loss_fake(a: NLFTLossArgs, inplace: bool = False) -> NLFTLossOut:
    base, n = a.base, a.labels.numel()
    acc = acc_dtype(base.dtype)
    store = GradStore(a.grad)
    stored = store == GradStore.FORWARD and not inplace
    details = [base.new_empty(n, dtype=torch.bool if name in BOOL_DETAILS else acc) for name in DETAIL_FIELDS]
    return NLFTLossOut(
        base.new_empty(n if a.reduction == "none" else (), dtype=acc),
        base.new_empty(base.shape, dtype=grad_dtype(base.dtype)) if stored else _empty(base),
        base.new_empty(n, dtype=acc),
        base.new_empty(n if store == GradStore.BACKWARD else 0, dtype=acc),
        *details,
    )


nlft_loss_op = define("nlft_loss", NLFTLossArgs, NLFTLossOut, lambda a: _nlft_loss(a, False), _nlft_loss_fake)
nlft_loss_inplace_op = define(
    "nlft_loss_",
    NLFTLossArgs,
    NLFTLossOut,
    lambda a: _nlft_loss(a, True),
    lambda a: _nlft_loss_fake(a, True),
    mutates=("base",),
)


# ---------------------------------------------------------------------------------------------
# token_logprobs


class TokenLogprobsArgs(NamedTuple):
    """logits: [B, T, V] (unit stride over V); labels: [N] int64."""

    logits: Tensor
    labels: Tensor
    ignore_index: int
    backend: str
    validate: bool


class TokenLogprobsOut(NamedTuple):
    logprobs: Tensor  # [N] ACC, 0 at ignore_index
    lse: Tensor  # [N] ACC


def _token_logprobs_impl(a: TokenLogprobsArgs) -> TokenLogprobsOut:
    x = a.logits
    if a.validate:
        check_label_range(a.labels, x.shape[-1], a.ignore_index)
    backend = resolve_backend(a.backend, x.device, a.labels.numel(), x.shape[-1])
    lp, lse = implementation(backend).label_logprobs(x, a.labels, a.ignore_index)
    if a.validate and not bool(torch.isfinite(lp).all()):
        raise ValueError("logits contains non-finite values (NaN or +inf, or -inf at a label) in a labelled row")
    return TokenLogprobsOut(lp, lse)


def _token_logprobs_fake(a: TokenLogprobsArgs) -> TokenLogprobsOut:
    lp = a.logits.new_empty(a.labels.numel(), dtype=acc_dtype(a.logits.dtype))
    return TokenLogprobsOut(lp, torch.empty_like(lp))


token_logprobs_op = define(
    "token_logprobs", TokenLogprobsArgs, TokenLogprobsOut, _token_logprobs_impl, _token_logprobs_fake
)


# ---------------------------------------------------------------------------------------------
# token_weighted_cross_entropy


class CETokenFields(NamedTuple):
    """The per-token fields of both token-weighted cross-entropy ops (``WeightedCEArgs``,
    ``linear_ce.LinearCEArgs``), in their schemas' order: labels: [N] int64; weights: [N] float
    (constants); reduction: "mean" (over labelled tokens), "sum" or "none"."""

    labels: Tensor
    weights: Tensor
    ignore_index: int
    reduction: str
    backend: str
    validate: bool


# logits: [B, T, V] (unit stride over V), the ``CETokenFields``, grad: a ``GradStore``.
WeightedCEArgs = NamedTuple("WeightedCEArgs", [("logits", Tensor), *schema_fields(CETokenFields), ("grad", int)])


class WeightedCEOut(NamedTuple):
    loss: Tensor  # reduced, or [N] for "none"
    grad: Tensor  # the gradient written in forward (FORWARD, not in place), else empty
    coef: Tensor  # [N] each row's gradient coefficient: weight times the reduction's scale
    lse: Tensor  # [N]


def _weighted_ce(a: WeightedCEArgs, inplace: bool) -> WeightedCEOut:
    x = a.logits
    if a.validate:
        check_label_range(a.labels, x.shape[-1], a.ignore_index)
        if not bool(torch.isfinite(a.weights).all()):
            raise ValueError("weights must be finite")
    backend = implementation(resolve_backend(a.backend, x.device, a.labels.numel(), x.shape[-1]))
    acc = acc_dtype(x.dtype)
    valid = a.labels != a.ignore_index
    weights = a.weights.to(acc)
    scale = 1.0 / valid.sum().clamp(min=1).to(acc) if a.reduction == "mean" else torch.ones((), dtype=acc)
    coef = torch.where(valid, weights * scale.to(x.device), 0.0)
    grad = None
    if GradStore(a.grad) == GradStore.FORWARD:  # one pass: log-probs and the gradient
        grad = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        lp, lse = backend.label_logprobs_grad(x, a.labels, coef, a.ignore_index, grad)
        if inplace:
            bump_version(x)
    else:
        lp, lse = backend.label_logprobs(x, a.labels, a.ignore_index)
    if a.validate and not bool(torch.isfinite(lp).all()):
        raise ValueError("logits contains non-finite values (NaN or +inf, or -inf at a label) in a labelled row")
    token = torch.where(valid, -weights * lp, 0.0)
    loss = token if a.reduction == "none" else token.sum() * scale
    return WeightedCEOut(loss, grad if grad is not None and not inplace else _empty(x), coef, lse)


def _weighted_ce_fake(a: WeightedCEArgs, inplace: bool = False) -> WeightedCEOut:
    x, n = a.logits, a.labels.numel()
    acc = acc_dtype(x.dtype)
    stored = GradStore(a.grad) == GradStore.FORWARD and not inplace
    return WeightedCEOut(
        x.new_empty(n if a.reduction == "none" else (), dtype=acc),
        x.new_empty(x.shape) if stored else _empty(x),
        x.new_empty(n, dtype=acc),
        x.new_empty(n, dtype=acc),
    )


weighted_ce_op = define(
    "token_weighted_cross_entropy", WeightedCEArgs, WeightedCEOut, lambda a: _weighted_ce(a, False), _weighted_ce_fake
)
weighted_ce_inplace_op = define(
    "token_weighted_cross_entropy_",
    WeightedCEArgs,
    WeightedCEOut,
    lambda a: _weighted_ce(a, True),
    lambda a: _weighted_ce_fake(a, True),
    mutates=("logits",),
)
