"""The compiled kernels of ``nlft_kernels._C`` as torch.library custom ops, with fake
implementations: the backends ``cpp`` (CPU tensors) and ``cuda`` (CUDA tensors) of
``nlft_kernels.backends``. ``torch.compile`` sees each call as one opaque node with known
output shapes, never a pybind call.

The row rule's constants cross the op boundary as ``RuleConstants.floats()`` plus
``ignore_index`` and reach the binding by keyword (``RuleConstants.kwargs()``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nlft_kernels.config import NLFTConfig
from nlft_kernels.extension import compiled
from nlft_kernels.ops.contracts import RuleConstants, ViewMode, acc_dtype
from nlft_kernels.ops.inputs import Views
from nlft_kernels.ops.launch import grad_dtype

# Declared with the low-level API: a ``torch.library.custom_op`` adds a Python autograd kernel
# whose first eager call imports ~800 modules (sympy, dynamo: ~75 MB, ~1.5 s), which every
# eager training run would pay. These ops run inside the autograd Functions (grad mode off),
# and inside the losses' own custom ops (ops/custom_ops.py) under torch.compile.
_LIB = torch.library.Library("nlft_kernels", "FRAGMENT")
_LIB.define(
    "ext_row_pass(Tensor base, Tensor standard, int standard_mode, Tensor? judge, int judge_mode, Tensor labels, "
    "Tensor wrong, Tensor scale, float[] rule, int ignore_index, bool compute_grad) -> (Tensor, Tensor, Tensor)"
)
_LIB.define("ext_scale_rows(Tensor(a!) grad, Tensor rows, Tensor factor) -> ()")
_LIB.define("ext_label_logprobs(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)")


def _row_pass_impl(base, standard, standard_mode, judge, judge_mode, labels, wrong, scale, rule, ignore_index,
                   compute_grad):  # fmt: skip
    """``_C.first_stage``: (stats [3, N] ACC, saliency [N] bool, gradient shaped like ``base``
    in ``grad_dtype``, or an empty tensor without ``compute_grad``)."""
    constants = RuleConstants.from_floats(rule, ignore_index)
    stats, saliency, grad = compiled().first_stage(
        base, standard, standard_mode, judge, judge_mode, labels, wrong, scale,
        **constants.kwargs(), compute_grad=compute_grad,
    )  # fmt: skip
    return stats, saliency, base.new_empty(0) if grad is None else grad


def _row_pass_fake(base, standard, standard_mode, judge, judge_mode, labels, wrong, scale, rule, ignore_index,
                   compute_grad):  # fmt: skip
    rows = labels.numel()
    stats = base.new_empty(3, rows, dtype=acc_dtype(base.dtype))
    grad = base.new_empty(base.shape, dtype=grad_dtype(base.dtype)) if compute_grad else base.new_empty(0)
    return stats, base.new_empty(rows, dtype=torch.bool), grad


def _scale_rows_impl(grad, rows, factor):
    """``_C.scale_rows``: grad[r] *= factor[r] for r in ``rows``, in place (contiguous CPU ``grad``)."""
    compiled().scale_rows(grad, rows, factor)


def _label_logprobs_impl(logits, labels, ignore_index):
    """``_C.label_logprobs``: (log p(label) [N], lse [N]) in ACC of CPU ``logits`` [B, T, V]."""
    return compiled().label_logprobs(logits, labels, ignore_index)


def _label_logprobs_fake(logits, labels, ignore_index):
    lp = logits.new_empty(labels.numel(), dtype=acc_dtype(logits.dtype))
    return lp, torch.empty_like(lp)


for _name, _impl, _fake in (
    ("ext_row_pass", _row_pass_impl, _row_pass_fake),
    ("ext_scale_rows", _scale_rows_impl, lambda grad, rows, factor: None),
    ("ext_label_logprobs", _label_logprobs_impl, _label_logprobs_fake),
):
    _LIB.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"nlft_kernels::{_name}", _fake, lib=_LIB)

ext_row_pass_op = torch.ops.nlft_kernels.ext_row_pass.default
ext_scale_rows_op = torch.ops.nlft_kernels.ext_scale_rows.default
ext_label_logprobs_op = torch.ops.nlft_kernels.ext_label_logprobs.default


# ---------------------------------------------------------------------------------------------
# The registry's entries, with the signatures of the Triton launchers (ops/kernels.py).


def row_pass(v: Views, cfg: NLFTConfig, compute_grad: bool, inplace_grad: bool = False):
    """The row pass of the C++ (CPU tensors) or CUDA kernel (CUDA tensors). The bindings
    allocate the gradient themselves: ``inplace_grad`` is not honoured (a new buffer in
    ``grad_dtype`` comes back)."""
    rule = RuleConstants.of(cfg)
    judge_mode = ViewMode(v.judge_mode)
    stats, saliency, grad = ext_row_pass_op(
        v.base, v.standard, int(v.standard_mode), v.judge, int(judge_mode), v.labels, v.wrong, v.scale,
        rule.floats(), rule.ignore_index, compute_grad,
    )  # fmt: skip
    return stats, saliency, grad if compute_grad else None


def scale_rows(grad: Tensor, factor: Tensor, rows: Tensor) -> None:
    """grad[r] *= factor[r] for the rows ``rows``, in place, in the accumulator type (CPU)."""
    ext_scale_rows_op(grad.view(-1, grad.shape[-1]), rows, factor)


def label_logprobs(x: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(log p(label) [N], lse [N]) of CPU ``x`` [B, T, V]: one vectorised sweep per labelled row."""
    return ext_label_logprobs_op(x, labels, ignore_index)
