"""The chunked passes of the fused linear losses: the [N, V] logits of ``hidden @ weight.T + bias``
never exist, ``rows`` of them at a time do.

The chunk driver (``run_chunks``), per chunk of c rows, for any row pass:

  1. ``Head.logits``: one GEMM, the logits [c, V] in the input dtype (float32 accumulation
     inside the GEMM, as ``F.linear``);
  2. the row pass reads them and writes the logits gradient G over them, in place (Liger's way);
  3. ``Grads.add``: dX[rows] = G @ W, dW += G.T @ hidden_c (into a float32 accumulator:
     ``accumulate_mm``), db += G.sum(0).

Bytes per logit of a chunk, e the input dtype's size (``chunk_traffic``; counted in
tests/ops/test_linear_traffic.py): the GEMM writes e; the NLFT row pass reads 2e (its
log-sum-exp sweep and its gradient sweep) and writes e; the dX and dW GEMMs read e each; a
bias reads e more: 6e per logit (7e with a bias), 12 B in bfloat16. The GEMMs' [V, D] and
[c, D] operands are not per logit: a chunk
reads W twice (logits, dX) and reads and writes the float32 dW accumulator once (the first
chunk only writes it): ``chunk_rows_for`` makes chunks long enough for that to hide under the
GEMMs' arithmetic.

The float32 dW accumulator keeps the weight gradient at one rounding to the weight's dtype
(that of ``F.linear``'s backward over all rows); adding each chunk in bfloat16 instead would
round once per chunk (tests/ops/test_nlft_linear_loss.py, ``test_weight_gradient_is_rounded_once``).

The NLFT loss (``forward_pass``) needs every row of a sample for its per-sample rule (the 6%
rule, saliency clusters): chunks are groups of whole samples (``sample_groups``), whose second
stage runs before the gradient GEMMs, so a group's gradient is final when folded in; the
cluster walk is one launch per group on the GPU (``ops/cluster_kernels.py``). A sample longer
than a chunk is chunked on its own: its provisional gradients are folded in as they come and
the rows the second stage changes are fixed afterwards (``_fix_rows``: each row's gradient is
linear in its G row, so the hidden gradient of those rows is rescaled and the weight and bias
gradients get ``((factor - 1) G_rows).T @ hidden_rows``, one more [k, V, D] GEMM pair for k rows).

The teachers' label log-probs (``linear_label_logprobs``) keep float32 logits tiles: a forward
pass only, where a bfloat16 logit near 30 (off by up to 1/16) would move a teacher's log-prob,
and with it the saliency decisions of correct samples, by as much.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch

from nlft_kernels.backends import implementation
from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.chunk_rows import auto_chunk_rows, chunk_rows_for  # noqa: F401 - imported from here
from nlft_kernels.ops.contracts import acc_dtype
from nlft_kernels.ops.inputs import DETAIL_FIELDS, Views, as_3d
from nlft_kernels.ops.launch import row_pass_traffic
from nlft_kernels.ops.stages import SecondStage, rescale_rows, second_stage

# ---------------------------------------------------------------------------------------------
# The GEMMs of a chunk.

_OUT_DTYPE_MATMULS: dict[tuple[str, torch.dtype], bool] = {}


def out_dtype_matmuls(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch multiplies 16-bit ``dtype`` matrices on ``device`` straight into float32
    (``torch.mm``/``torch.addmm`` with ``out_dtype=torch.float32``, also in place into ``out``):
    CUDA in recent torch, not the CPU in torch 2.14. Probed once per (device type, dtype) on a
    product whose float32 value a 16-bit result would round away."""
    key = (device.type, dtype)
    if key not in _OUT_DTYPE_MATMULS:
        ok = False
        if dtype in (torch.float16, torch.bfloat16):
            a = torch.tensor([[1.0, 2.0**-9]], device=device).to(dtype)
            b = torch.ones(2, 1, device=device, dtype=dtype)
            try:
                acc = torch.ones(1, 1, device=device)
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                mm = torch.mm(a, b, out_dtype=torch.float32)
                biased = torch.addmm(torch.ones(1, device=device), a, b, out_dtype=torch.float32)
                ok = [float(acc), float(mm), float(biased)] == [2 + 2.0**-9, 1 + 2.0**-9, 2 + 2.0**-9]
            except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
                ok = False
        _OUT_DTYPE_MATMULS[key] = ok
    return _OUT_DTYPE_MATMULS[key]


def accumulate_mm(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` into ``acc`` (float32, float64 for float64 operands; None: the first
    product, written without reading a zeroed buffer), ``a`` [m, k] and ``b`` [k, n] in one
    float dtype. 16-bit operands go straight into float32 where torch has ``out_dtype`` matmuls
    for the device (``out_dtype_matmuls``); elsewhere (the CPU) they are upcast first. Returns
    the accumulator."""
    wide = acc_dtype(a.dtype)
    if a.dtype != wide and out_dtype_matmuls(a.device, a.dtype):
        if acc is None:
            return torch.mm(a, b, out_dtype=wide)
        return torch.addmm(acc, a, b, out_dtype=wide, out=acc)
    a, b = a.to(wide), b.to(wide)
    return torch.mm(a, b) if acc is None else acc.addmm_(a, b)


@dataclass
class Head:
    """The LM head as the chunk GEMMs take it.

    weight: [V, D], the GEMM operand; bias: [V] or None, in ``logits_dtype``; dtype: of hidden
    and of the head; logits_dtype: of the logits chunks, the head's own dtype for the loss
    (``F.linear``'s logits) or float32 for the teachers' log-probs. Float32 logits of a 16-bit
    head come from ``mm(h, W.T, out_dtype=float32)`` where the device has it
    (``out_dtype_matmuls``: CUDA); elsewhere ``weight`` is the head upcast once per call.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype
    logits_dtype: torch.dtype

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, logits_dtype: torch.dtype | None = None) -> Head:
        logits_dtype = weight.dtype if logits_dtype is None else logits_dtype
        native = logits_dtype == weight.dtype or out_dtype_matmuls(weight.device, weight.dtype)
        return cls(
            weight=weight if native else weight.to(logits_dtype),
            bias=None if bias is None else bias.to(logits_dtype),
            dtype=weight.dtype,
            logits_dtype=logits_dtype,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[c, V] logits (contiguous, ``logits_dtype``) of [c, D] hidden rows (in ``dtype``)."""
        if self.weight.dtype != self.logits_dtype:
            if self.bias is None:
                return torch.mm(hidden, self.weight.t(), out_dtype=self.logits_dtype)
            return torch.addmm(self.bias, hidden, self.weight.t(), out_dtype=self.logits_dtype)
        hidden = hidden.to(self.weight.dtype)
        return hidden @ self.weight.t() if self.bias is None else torch.addmm(self.bias, hidden, self.weight.t())


class Grads:
    """The gradients being accumulated: hidden [N, D] (input dtype), weight [V, D] and bias [V]
    (float32 accumulators, float64 for float64 inputs; the weight's made by the first chunk);
    None where not wanted."""

    def __init__(self, hidden, weight, bias, want: tuple[bool, bool, bool]):
        acc = acc_dtype(weight.dtype)
        self.want_weight = want[1]
        self.hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if want[0] else None
        self.weight: torch.Tensor | None = None
        self.bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want[2] else None

    def add(self, grad: torch.Tensor, hidden: torch.Tensor, head: Head, rows: slice | None) -> None:
        """Fold ``grad`` [c, V] (the logits gradient of ``hidden`` [c, D], in the head's dtype;
        a compiled row pass's own buffer is cast to it) into the gradients; ``rows`` says where
        the hidden gradient goes (None: leave it, the fix-up pass)."""
        grad = grad.view(-1, head.weight.shape[0]).to(head.weight.dtype)
        if self.hidden is not None and rows is not None:
            torch.mm(grad, head.weight, out=self.hidden[rows])
        if self.want_weight:
            self.weight = accumulate_mm(self.weight, grad.t(), hidden.to(grad.dtype))
        if self.bias is not None:
            self.bias += grad.sum(0, dtype=self.bias.dtype)


GradsOut = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def grads_out(grads: Grads | None, weight: torch.Tensor, bias: torch.Tensor | None) -> GradsOut:
    """(hidden, weight, bias) gradients, the head's in the parameters' dtypes; None where not wanted."""
    if grads is None:
        return None, None, None
    dw = None
    if grads.want_weight:
        dw = torch.zeros_like(weight) if grads.weight is None else grads.weight.to(weight.dtype)
    return grads.hidden, dw, None if grads.bias is None else grads.bias.to(bias.dtype)


# ---------------------------------------------------------------------------------------------
# The chunk driver.


@dataclass
class Chunk:
    """One chunk of rows as the driver hands it to a row pass.

    rows: the rows' positions in ``hidden`` (a slice, or an index [c] for the fix-up);
    hidden: [c, D]; logits: [c, V] contiguous, in the head's ``logits_dtype``, freshly made
    for this row pass, which may overwrite them.
    """

    rows: slice | torch.Tensor
    hidden: torch.Tensor
    logits: torch.Tensor


# A row pass: reads ``chunk.logits`` and returns their gradient [c, V] in the logits dtype,
# normally written over ``chunk.logits`` itself (then it moves no other [c, V] bytes), or None
# where no gradient is wanted.
RowPass = Callable[[Chunk], torch.Tensor | None]


def run_chunks(
    hidden: torch.Tensor,
    head: Head,
    row_pass: RowPass,
    grads: Grads | None,
    chunks: Iterable[slice | torch.Tensor],
) -> None:
    """For each chunk of rows of ``hidden`` [N, D] (a slice or an index [c]): the logits GEMM,
    ``row_pass`` on them, and with ``grads`` the gradient GEMMs of what it returns (the hidden
    gradient's rows for slices; an index is the fix-up of rows whose hidden gradient is
    rescaled apart).

    Contract: the row pass gets the logits [c, V] (``head.logits_dtype``, contiguous) and
    returns G [c, V] (their gradient, preferably written over them) or None. Bytes per logit
    moved here besides the row pass's own: the GEMM writes the logits once; with ``grads`` the
    dX and dW GEMMs read G once each (and the bias sum once). One chunk's buffers live at a
    time: the next logits exist only after the last G is folded in."""
    for rows in chunks:
        _one_chunk(hidden, head, row_pass, grads, rows)


def _one_chunk(hidden, head: Head, row_pass: RowPass, grads: Grads | None, rows) -> None:
    h = hidden[rows]
    grad = row_pass(Chunk(rows, h, head.logits(h)))
    if grad is not None and grads is not None:
        grads.add(grad, h, head, rows if isinstance(rows, slice) else None)


def linear_pass(hidden, weight, bias, row_pass: RowPass, want: tuple[bool, bool, bool], rows: int) -> GradsOut:
    """``row_pass`` over flat ``hidden`` [N, D] under the head (``weight`` [V, D], ``bias`` [V]
    or None, the logits in their dtype), ``rows`` rows at a time (``run_chunks``); returns the
    gradients in ``want`` (hidden, weight, bias) of the loss whose logits gradients the row
    pass returns, in the parameters' dtypes (None where not wanted). What a fused linear loss
    over any row pass runs: its row pass computes the loss terms of each chunk on the side."""
    grads = Grads(hidden, weight, bias, want) if any(want) else None
    with torch.autocast(hidden.device.type, enabled=False):
        run_chunks(hidden, Head.of(weight, bias), row_pass, grads, row_slices(0, hidden.shape[0], rows))
    return grads_out(grads, weight, bias)


def row_slices(start: int, stop: int, rows: int) -> list[slice]:
    """Rows [start, stop) as slices of at most ``rows`` rows."""
    return [slice(first, min(first + rows, stop)) for first in range(start, stop, rows)]


def chunk_traffic(vocab: int, dtype: torch.dtype, *, bias: bool, out_dtype_matmul: bool) -> dict[str, int]:
    """Bytes by stage that one labelled row of an NLFT chunk (teachers as log-probs) moves
    through [c, V]-sized buffers, with the gradients wanted: ``logits`` the GEMM's write;
    ``row_pass`` the Triton row pass's reads and in-place write (``row_pass_traffic``);
    ``dx``/``dw`` the gradient GEMMs' reads of G; ``bias`` its sum; on a device without
    float32-output 16-bit GEMMs (``out_dtype_matmul`` False: the CPU) ``dw`` reads G upcast to
    float32 (a cast reading e and writing 4, then 4 read). Per logit: divide by ``vocab``."""
    e = dtype.itemsize
    row = row_pass_traffic(vocab, dtype, standard_logits=False, judge_logits=False, wrong=False, grad_type=dtype)
    wide = acc_dtype(dtype).itemsize
    upcast = e != wide and not out_dtype_matmul
    return {
        "logits": vocab * e,
        "row_pass": row["base"] + row["grad"],
        "dx": vocab * e,
        "dw": vocab * (e + 2 * wide if upcast else e),
        "bias": vocab * e if bias else 0,
    }


def sample_groups(sample_ids: torch.Tensor, rows_per_chunk: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) that cover the rows in order, each made of whole samples
    (``sample_ids`` [N], non-decreasing) and at most ``rows_per_chunk`` rows long, except a
    sample longer than that, which is a group of its own."""
    counts = torch.unique_consecutive(sample_ids, return_counts=True)[1].tolist()
    groups, start, stop = [], 0, 0
    for count in counts:
        if stop > start and stop + count - start > rows_per_chunk:
            groups.append((start, stop))
            start = stop
        stop += count
    groups.append((start, stop))
    return groups


# ---------------------------------------------------------------------------------------------
# The NLFT loss over the driver.


@dataclass
class NLFTLinearLossParams:
    """Everything of one ``nlft_linear_loss`` call but hidden, weight and bias.

    views: the rows, without base logits (each chunk brings its own); rows: rows per chunk;
    clusters: whether the saliency clusters walk ``hidden``; train: the caller's grad mode
    (forward runs with grad mode off, so it cannot tell whether a backward can follow).
    """

    views: Views
    sample_ids: torch.Tensor
    correct: torch.Tensor
    cfg: NLFTConfig
    reduction: str
    backend: str
    validate: bool
    rows: int
    clusters: bool
    train: bool


@dataclass
class ForwardResult:
    """What the forward pass decides: the loss (per row [N] for ``"none"``), the details by
    field of :class:`NLFTDetails` ([N] each) and the factor [N] of each row's provisional gradient."""

    loss: torch.Tensor
    per_row: dict[str, torch.Tensor]
    factor: torch.Tensor


def nlft_row_pass(
    views: Views, cfg: NLFTConfig, backend: str, compute_grad: bool, scale: torch.Tensor | None = None
) -> tuple[RowPass, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The NLFT row pass of a chunk as a ``RowPass``: the backend's first stage on the chunk's
    logits as base view (the gradient written over them where the backend can), with each row's
    ``scale`` [N] (default: ``views.scale``) folded into its gradient. Returns (the pass, the
    list that receives each chunk's (stats [3, c], saliency [c]))."""
    scale = views.scale if scale is None else scale
    row_pass = implementation(backend).row_pass
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def run(chunk: Chunk) -> torch.Tensor | None:
        if isinstance(chunk.rows, slice):
            v = views.rows(chunk.rows.start, chunk.rows.stop, chunk.logits)
        else:
            v = views.select(chunk.rows, chunk.logits)
        v = replace(v, scale=scale[chunk.rows])
        stats, saliency, grad = row_pass(v, cfg, compute_grad, inplace_grad=True)
        seen.append((stats, saliency))
        return grad

    return run, seen


def forward_pass(hidden, head: Head, p: NLFTLinearLossParams, grads: Grads | None) -> ForwardResult:
    """Every group of whole samples (``sample_groups``): its chunks' statistics, its second
    stage, and with ``grads`` its gradients (``_group_pass``)."""
    n = hidden.shape[0]
    factor = torch.empty(n, dtype=acc_dtype(hidden.dtype), device=hidden.device)
    losses, per_rows = [], []
    for start, stop in sample_groups(p.sample_ids, p.rows):
        stage = _group_pass(hidden, head, p, grads, start, stop)
        factor[start:stop] = stage.factor
        losses.append(stage.loss)
        per_rows.append(stage.per_row)
        if grads is not None and stop - start > p.rows and stage.rows.numel():
            _fix_rows(hidden, head, p, grads, stage.rows + start, factor)
    loss = torch.cat(losses) if p.reduction == "none" else torch.stack(losses).sum()
    per_row = {name: torch.cat([r[name] for r in per_rows]) for name in DETAIL_FIELDS}
    return ForwardResult(loss, per_row, factor)


def _group_pass(hidden, head: Head, p: NLFTLinearLossParams, grads: Grads | None, start: int, stop: int):
    """The rows [start, stop) of whole samples through the driver; returns their second stage.
    A group of one chunk gets its second stage inside the row pass, so the gradient the GEMMs
    fold in is final (a few rows rescaled in place); a longer one folds in provisional gradients."""
    first, seen = nlft_row_pass(p.views, p.cfg, p.backend, grads is not None)
    group = replace(
        p.views, labels=p.views.labels[start:stop], wrong=p.views.wrong[start:stop], scale=p.views.scale[start:stop]
    )

    def decide() -> SecondStage:
        stats = torch.cat([s for s, _ in seen], 1)
        saliency = torch.cat([s for _, s in seen])
        if p.validate:
            _check_base_finite(stats, group, p.cfg.ignore_index)
        return second_stage(
            stats, saliency, group, p.sample_ids[start:stop], p.correct,
            hidden[start:stop] if p.clusters else None, p.cfg, p.reduction, p.validate, p.backend,
        )  # fmt: skip

    if stop - start > p.rows:
        run_chunks(hidden, head, first, grads, row_slices(start, stop, p.rows))
        return decide()
    stages: list[SecondStage] = []

    def final(chunk: Chunk) -> torch.Tensor | None:
        grad = first(chunk)
        stages.append(decide())
        if grad is not None and stages[0].rows.numel():
            rescale_rows(grad, stages[0].factor, stages[0].rows, p.backend)
        return grad

    run_chunks(hidden, head, final, grads, [slice(start, stop)])
    return stages[0]


def _fix_rows(hidden, head: Head, p: NLFTLinearLossParams, grads: Grads, rows, factor) -> None:
    """Apply the second stage's ``factor`` [N] to the gradients of the rows ``rows`` [k]: the
    hidden gradient's rows rescaled, the weight and bias gradients given the rows' provisional
    gradient times ``factor - 1`` (folded into the row pass's scale: no extra [k, V] pass)."""
    if grads.hidden is not None:
        grads.hidden.index_copy_(0, rows, grads.hidden[rows] * factor[rows, None].to(grads.hidden.dtype))
    if not grads.want_weight and grads.bias is None:
        return
    scale = p.views.scale * (factor - 1)
    fix, _ = nlft_row_pass(p.views, p.cfg, p.backend, True, scale)
    run_chunks(hidden, head, fix, grads, [rows[i : i + p.rows] for i in range(0, rows.numel(), p.rows)])


def _check_base_finite(stats: torch.Tensor, views: Views, ignore_index: int) -> None:
    valid = views.labels != ignore_index
    if bool((valid & ~torch.isfinite(stats[0])).any()):
        raise ValueError(
            "the base logits hidden @ weight.T (+ bias) are non-finite (NaN or inf) in a labelled row: "
            "check hidden, weight and bias"
        )


def flat_rows_2d(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1])


# ---------------------------------------------------------------------------------------------
# The whole passes, as the autograd Function and the custom op (ops/custom_ops.py) both run them.


def linear_forward(hidden, weight, bias, p: NLFTLinearLossParams, want) -> tuple[ForwardResult, GradsOut]:
    """The forward pass over flat ``hidden`` [N, D]: its result and, for reductions to a scalar,
    the gradients in ``want`` (hidden, weight, bias); ``"none"`` computes them in backward."""
    grads = Grads(hidden, weight, bias, want) if any(want) and p.reduction != "none" else None
    with torch.autocast(hidden.device.type, enabled=False):
        result = forward_pass(hidden, Head.of(weight, bias), p, grads)
    return result, grads_out(grads, weight, bias)


def linear_none_backward(
    hidden, weight, bias, views: Views, cfg: NLFTConfig, backend: str, rows: int, want, factor, grad_loss
) -> GradsOut:
    """The gradients in ``want`` of ``reduction="none"`` for the per-row upstream ``grad_loss``
    [N]: a second chunked pass whose row pass folds ``factor * grad_loss`` into each row's scale."""
    scale = views.scale * factor * grad_loss.reshape(-1).to(factor.dtype)
    row_pass, _ = nlft_row_pass(views, cfg, backend, True, scale)
    return linear_pass(hidden, weight, bias, row_pass, want, rows)


@torch.no_grad()
def linear_label_logprobs(hidden, weight, bias, labels, ignore_index: int, rows: int, backend: str) -> torch.Tensor:
    """[N] label log-probs in ACC of flat ``hidden`` [N, D] under the head, ``rows`` at a time,
    from float32 (float64) logits tiles."""
    n = labels.numel()
    out = torch.empty(n, dtype=acc_dtype(hidden.dtype), device=hidden.device)
    label_logprobs = implementation(backend).label_logprobs

    def row_pass(chunk: Chunk) -> None:
        rows_ = chunk.rows
        out[rows_] = label_logprobs(as_3d(chunk.logits, "logits"), labels[rows_], ignore_index)[0]

    with torch.autocast(hidden.device.type, enabled=False):
        head = Head.of(weight, bias, acc_dtype(weight.dtype))
        run_chunks(hidden, head, row_pass, None, row_slices(0, n, rows))
    return out
