"""The token-weighted cross-entropy straight from hidden states, as a ``torch.library`` op: the
chunk driver of the fused linear losses (``ops/linear_chunks.py``'s ``linear_pass``: per chunk of
rows, the logits GEMM, a row pass that writes the logits' gradient over them, the gradient
GEMMs) with the cross-entropy's row pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from nlft_kernels.backends import implementation, resolve_backend
from nlft_kernels.ops.contracts import acc_dtype
from nlft_kernels.ops.inputs import as_3d, check_label_range
from nlft_kernels.ops.library import define
from nlft_kernels.ops.linear_chunks import Chunk, RowPass, auto_chunk_rows, linear_pass
from nlft_kernels.ops.loss_ops import CETokenFields, schema_fields


def ce_row_pass(labels: Tensor, coef: Tensor | None, ignore_index: int, backend: str, logprobs: Tensor) -> RowPass:
    """The cross-entropy's row pass: each chunk's label log-probs into ``logprobs`` [N] and, with
    ``coef`` [N], its gradient ``coef * (softmax - onehot)`` over the chunk's logits (one pass)."""
    kernels = implementation(backend)

    def run(chunk: Chunk) -> Tensor | None:
        x = as_3d(chunk.logits, "logits")
        chunk_labels = labels[chunk.rows]
        if coef is None:
            logprobs[chunk.rows] = kernels.label_logprobs(x, chunk_labels, ignore_index)[0]
            return None
        lp, _ = kernels.label_logprobs_grad(x, chunk_labels, coef[chunk.rows], ignore_index, chunk.logits)
        logprobs[chunk.rows] = lp
        return chunk.logits

    return run


# hidden: [N, D]; weight: [V, D]; bias: [V] or None; the ``CETokenFields`` (labels, weights,
# reduction...); rows: per chunk (0: automatic); want: which of the hidden, weight and bias
# gradients to compute (none in forward for "none"); grad_output: [] or [N], the upstream
# gradient folded into the rows' coefficients (forward: 1).
LinearCEArgs = NamedTuple(
    "LinearCEArgs",
    [("hidden", Tensor), ("weight", Tensor), ("bias", Tensor | None), *schema_fields(CETokenFields)]
    + [("rows", int), ("want", list[bool]), ("grad_output", Tensor)],
)


class LinearCEOut(NamedTuple):
    loss: Tensor
    grad_hidden: Tensor
    grad_weight: Tensor
    grad_bias: Tensor


def _linear_ce(a: LinearCEArgs) -> LinearCEOut:
    if a.validate:
        check_label_range(a.labels, a.weight.shape[0], a.ignore_index)
        if not bool(torch.isfinite(a.weights).all()):
            raise ValueError("weights must be finite")
    acc = acc_dtype(a.hidden.dtype)
    backend = resolve_backend(a.backend, a.hidden.device)
    rows = a.rows or auto_chunk_rows(a.hidden.shape[0], a.weight)
    valid = a.labels != a.ignore_index
    weights = a.weights.to(acc)
    scale = 1.0 / valid.sum().clamp(min=1).to(acc) if a.reduction == "mean" else torch.ones((), dtype=acc)
    coef = torch.where(valid, weights * scale * a.grad_output.to(acc).reshape(-1), 0.0)
    logprobs = torch.zeros(a.labels.numel(), dtype=acc, device=a.hidden.device)
    want = tuple(a.want)
    row_pass = ce_row_pass(a.labels, coef if any(want) else None, a.ignore_index, backend, logprobs)
    grads = linear_pass(a.hidden, a.weight, a.bias, row_pass, want, rows)
    if a.validate and not bool(torch.isfinite(logprobs).all()):
        raise ValueError(
            "the logits hidden @ weight.T (+ bias) are non-finite (NaN or inf) in a labelled row: "
            "check hidden, weight and bias"
        )
    token = torch.where(valid, -weights * logprobs, 0.0)
    loss = token if a.reduction == "none" else token.sum() * scale
    likes = (a.hidden, a.weight, a.weight)
    return LinearCEOut(loss, *[like.new_empty(0) if g is None else g for g, like in zip(grads, likes, strict=True)])


def _linear_ce_fake(a: LinearCEArgs) -> LinearCEOut:
    acc, n = acc_dtype(a.hidden.dtype), a.labels.numel()
    shapes = ((a.hidden, a.hidden.shape), (a.weight, a.weight.shape), (a.weight, a.weight.shape[:1]))
    grads = [like.new_empty(shape) if w else like.new_empty(0) for (like, shape), w in zip(shapes, a.want, strict=True)]
    return LinearCEOut(a.hidden.new_empty(n if a.reduction == "none" else (), dtype=acc), *grads)


linear_ce_op = define("linear_token_weighted_cross_entropy", LinearCEArgs, LinearCEOut, _linear_ce, _linear_ce_fake)
