"""The NLFT loss and teacher log-probs straight from hidden states: the [N, V] logits never exist.

``nlft_linear_loss(hidden, weight, ...)`` equals ``nlft_loss(hidden @ weight.T + bias, ...)``
(with ``hidden_states=hidden`` for the saliency clusters). The rows are processed in chunks:
per chunk, the logits ``[c, V]`` are one matmul, the core op's first stage (Triton on CUDA,
chunked torch elsewhere) turns them into the label statistics and the provisional gradient
``G_c = coef * (softmax - onehot)``, and two more matmuls fold ``G_c`` into the gradients of
``hidden`` (``G_c @ weight``) and ``weight`` (``G_c.T @ hidden_c``, accumulated in float32 in
place). Peak extra memory is a few [c, V] tensors plus the gradients themselves.

The logits tiles are float32 for every input dtype (float32 accumulation and output; see
``_Head``): the saliency tests compare probabilities with 0.95 and ratios with 1.5, and a
bfloat16 logit near 30 is off by up to 0.06, which moves a log-prob by as much and flips them.

The per-sample part of the rule (the 6% rule, saliency clusters) needs every row of a sample.
Chunks are cut at sample boundaries (``sample_groups``): a chunk of whole samples gets its
second stage, and so its final gradient, before the two matmuls fold it in. With clusters on
a GPU (``ONE_GROUP_WITH_CLUSTERS``), the second stage runs once over all rows instead, because
the cluster walk costs O(T) small ops per call, too many launches to repeat per chunk. Then
(and for a sample longer than a chunk) the provisional gradients are folded in as they come,
and the rows the second stage changes are fixed afterwards: each row's gradient is linear in its ``G`` row, so
the hidden gradient of those rows is rescaled in place and the weight/bias gradients are
corrected by recomputing ``G`` for those rows only: ``+ ((factor - 1) * G_rows).T @ hidden_rows``.
That costs up to two more [k, V, D] matmuls for k changed rows.

As in Liger-Kernel's fused linear cross-entropy, the gradients are computed in forward and
backward only scales them; with ``reduction="none"`` the upstream gradient is per row, so
forward keeps the statistics only and backward makes a second chunked pass.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch

from nlft_kernels.backends import resolve_backend
from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops._common import check_labels, check_logits
from nlft_kernels.ops.nlft_loss import (
    DETAIL_FIELDS,
    REDUCTIONS,
    VIEW_LOGITS,
    VIEW_LOGPROBS,
    VIEW_NONE,
    NLFTDetails,
    Views,
    _check_samples,
    _teacher,
    first_stage,
    rescale_rows,
    row_scale,
    saved_grads,
    scale_saved_grad,
    second_stage,
)
from nlft_kernels.ops.token_logprobs import acc_dtype, token_logprobs

# Chunk budget: the chunk's logits and gradient (float32, float64 for float64 inputs) plus two
# float32 [c, V] temporaries of the loss pass. A chunk may take this share of free memory, capped so that
# a GPU chunk stays large enough for full-speed matmuls without hoarding memory, and a CPU
# chunk stays near the cache-friendly size of the torch loss pass.
_FREE_SHARE = 4
_MAX_CHUNK_BYTES = {"cuda": 1 << 30}
_MAX_CHUNK_BYTES_OTHER = 128 << 20
# Off CUDA, a chunk's logits and gradient together stay within the size of the weight
# gradient (ACC [V, D]): at most D / 2 rows, so that the extra memory is at most about twice
# that gradient, as in torch's chunked linear_cross_entropy. It binds only for narrow heads
# (D / 2 below the byte cap's rows): at N=1024, D=256 (float32, 2 cores) it meets torch's
# chunked peak at V = 4096 / 16384 / 32000 (9 / 33 / 63 MiB against 10 / 34 / 64; the byte cap
# alone: 36 / 81 / 94), for about 1.6x / 1x / 1.1x the time at one thread (CPU time on a
# loaded machine): thinner chunks mean more per-sample groups, each paying the cluster walk.
# Thinner still costs more: 64 rows took about 1.4x and 32 rows 1.8x at V = 32000.
_CPU_ROWS_PER_DIM = 0.5
_MIN_CHUNK_ROWS = 16
_DEFAULT_CONFIG = NLFTConfig()
# Device types on which, with saliency clusters, the second stage runs once over all rows (see
# the module docstring); on the others (the CPU, where a call costs little) groups of whole
# samples spare the fix-up, which recomputes up to two [k, V, D] matmuls for k changed rows.
ONE_GROUP_WITH_CLUSTERS = ("cuda",)
# Tensor-core matmuls run best on row counts that are multiples of this.
_ROW_MULTIPLE = 64


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the CUDA allocator's view on GPUs, MemAvailable on the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def chunk_rows_for(
    n_rows: int, vocab: int, elem_size: int, device: torch.device, free: int | None = None, dim: int | None = None
) -> int:
    """Rows per chunk for ``n_rows`` rows over a vocabulary of ``vocab`` in ``elem_size``-byte
    logits and hidden size ``dim``: as many as fit the chunk budget (see ``_MAX_CHUNK_BYTES``)
    and, off CUDA, at most ``dim / 2`` (``_CPU_ROWS_PER_DIM``), a multiple of ``_ROW_MULTIPLE``
    when that many fit, then balanced so that the last chunk is not a sliver."""
    per_row = vocab * (2 * elem_size + 2 * 4)
    free = free_memory(device) if free is None else free
    budget = min(_MAX_CHUNK_BYTES.get(device.type, _MAX_CHUNK_BYTES_OTHER), free // _FREE_SHARE)
    rows = budget // per_row
    if dim is not None and device.type not in _MAX_CHUNK_BYTES:
        rows = min(rows, int(dim * _CPU_ROWS_PER_DIM))
    rows = max(_MIN_CHUNK_ROWS, rows)
    if rows > _ROW_MULTIPLE:
        rows -= rows % _ROW_MULTIPLE
    rows = min(rows, n_rows)
    return math.ceil(n_rows / math.ceil(n_rows / rows))


# ---------------------------------------------------------------------------------------------
# The chunked pass shared by forward, backward ("none") and the per-sample fix-up.


_OUT_DTYPE_MATMULS: dict[tuple[str, torch.dtype], bool] = {}


def out_dtype_matmuls(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch multiplies 16-bit ``dtype`` matrices on ``device`` straight into float32
    (``torch.mm``/``torch.addmm`` with ``out_dtype=torch.float32``, also in place into ``out``):
    CUDA in recent torch, not the CPU in torch 2.13. Probed once per (device type, dtype) on a
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


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a float32 (float64) ``acc`` [m, n] and ``a`` [m, k], ``b`` [k, n] in
    any float dtype, without an [m, n] temporary: 16-bit operands go straight into ``acc``
    where torch has ``out_dtype`` matmuls for the device (``out_dtype_matmuls``); elsewhere an
    operand not in ``acc``'s dtype is upcast (for the weight gradient, the [c, D] hidden chunk:
    ``_Grads.add`` hands G in float32 there), never a fresh [V, D] product per chunk."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.dtype == b.dtype and out_dtype_matmuls(acc.device, a.dtype) and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


@dataclass
class _Head:
    """The LM head as the chunk matmuls take it: logits come out in ACC (float32 for 16-bit
    inputs) and the gradients fold in from an ACC logits gradient (``_Grads.add``).

    weight: [V, D], the matmul operand; bias: [V] in ACC or None; dtype: of hidden and weight
    (and of the hidden gradient). Where torch has ``out_dtype`` matmuls for the device and
    dtype (``out_dtype_matmuls``: CUDA), ``weight`` is the 16-bit head itself and the logits
    are ``mm(h, W.T, out_dtype=float32)``, at 16-bit tensor-core speed. Elsewhere (the CPU in
    torch 2.13), ``weight`` is the head upcast to ACC once per call, a [V, D] float32 copy
    (upcasting per chunk would hold the same copy at its peak and pay for it per chunk), and
    each hidden chunk is upcast: every matmul runs in ACC. On CPUs without native bfloat16
    matmuls that is also the fast way: there a bfloat16 GEMM is emulated, 20-50x slower.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> _Head:
        acc = acc_dtype(weight.dtype)
        native = out_dtype_matmuls(weight.device, weight.dtype)
        return cls(
            weight=weight if native else weight.to(acc),
            bias=None if bias is None else bias.to(acc),
            dtype=weight.dtype,
        )

    @property
    def acc(self) -> torch.dtype:
        return acc_dtype(self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[c, V] logits in ACC of [c, D] hidden rows (in ``dtype``)."""
        if self.weight.dtype != self.acc:
            if self.bias is None:
                return torch.mm(hidden, self.weight.t(), out_dtype=self.acc)
            return torch.addmm(self.bias, hidden, self.weight.t(), out_dtype=self.acc)
        hidden = hidden.to(self.acc)
        return hidden @ self.weight.t() if self.bias is None else torch.addmm(self.bias, hidden, self.weight.t())


def _select(views: Views, index: torch.Tensor, logits: torch.Tensor) -> Views:
    """The rows ``index`` [k] of every view, with ``logits`` [k, V] as their base logits."""

    def cut(view, mode):
        if mode == VIEW_LOGITS:
            steps = view.shape[1]
            return view[index // steps, index % steps].unsqueeze(0)
        return view[index] if mode == VIEW_LOGPROBS else None

    return Views(
        base=logits.unsqueeze(0),
        standard=cut(views.standard, views.standard_mode),
        standard_mode=views.standard_mode,
        judge=cut(views.judge, views.judge_mode),
        judge_mode=views.judge_mode,
        labels=views.labels[index],
        wrong=views.wrong[index],
        scale=views.scale[index],
    )


class _Grads:
    """The gradients being accumulated: hidden [N, D] (input dtype), weight [V, D] and bias [V]
    (float32 accumulators, float64 for float64 inputs); None where not wanted."""

    def __init__(self, hidden, weight, bias, want: tuple[bool, bool, bool]):
        acc = acc_dtype(weight.dtype)
        self.hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if want[0] else None
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want[1] else None
        self.bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want[2] else None

    def add(self, grad: torch.Tensor, hidden: torch.Tensor, head: _Head, rows: slice | None) -> None:
        """Fold ``grad`` [c, V] in ACC, the logits gradient of ``hidden`` [c, D], into the
        gradients; ``rows`` says where the hidden gradient goes (None: leave it, the fix-up pass)."""
        # With a 16-bit head (out_dtype matmuls) both matmuls take G rounded to that dtype, as
        # F.linear's backward would (there the logits, so their gradient, are 16-bit): the
        # matmuls run at 16-bit speed with float32 accumulation, the hidden gradient is stored
        # in that dtype anyway, and the weight gradient still sums over chunks in float32.
        # With an upcast head G stays in ACC, and so do the matmuls.
        low = grad.to(head.weight.dtype)
        if self.hidden is not None and rows is not None:
            out = self.hidden[rows]
            if out.dtype == low.dtype:
                torch.mm(low, head.weight, out=out)
            else:
                out.copy_(torch.mm(low, head.weight))
        if self.weight is not None:
            accumulate_mm(self.weight, low.t(), hidden)
        if self.bias is not None:
            self.bias += grad.sum(0, dtype=self.bias.dtype)


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


@dataclass
class _Forward:
    """What the forward pass decides: the loss (per row [N] for ``"none"``), the details by
    field of :class:`NLFTDetails` ([N] each) and the factor [N] of each row's provisional gradient."""

    loss: torch.Tensor
    per_row: dict[str, torch.Tensor]
    factor: torch.Tensor


def _forward_pass(
    hidden,
    head: _Head,
    views: Views,
    sample_ids,
    correct,
    cfg,
    reduction,
    backend,
    validate,
    rows_per_chunk,
    clusters: bool,
    grads: _Grads | None,
) -> _Forward:
    """Every group of rows (whole samples: ``sample_groups``; all rows with ``clusters`` on a
    device of ``ONE_GROUP_WITH_CLUSTERS``):
    its chunks' statistics, its second stage, and with ``grads`` its gradients. A group that is
    one chunk gets its final gradient before the matmuls fold it in; a longer one folds the
    provisional gradients and fixes the rows the second stage changes afterwards (``_fix_rows``)."""
    n, vocab = hidden.shape[0], head.weight.shape[0]
    factor = torch.empty(n, dtype=acc_dtype(hidden.dtype), device=hidden.device)
    losses, per_rows = [], []
    one_group = clusters and hidden.device.type in ONE_GROUP_WITH_CLUSTERS
    for start, stop in [(0, n)] if one_group else sample_groups(sample_ids, rows_per_chunk):
        single = stop - start <= rows_per_chunk
        stats = torch.empty(3, stop - start, dtype=factor.dtype, device=hidden.device)
        saliency = torch.empty(stop - start, dtype=torch.bool, device=hidden.device)
        for first in range(start, stop, rows_per_chunk):
            last = min(first + rows_per_chunk, stop)
            h = hidden[first:last]
            # The last chunk's gradient is folded in by now: free it before this chunk's logits
            # exist (the peak is then one chunk's logits and gradient, not two gradients).
            grad = None
            chunk_stats, chunk_saliency, grad = first_stage(
                views.rows(first, last, head.logits(h)), cfg, backend, grads is not None
            )
            stats[:, first - start : last - start] = chunk_stats
            saliency[first - start : last - start] = chunk_saliency
            if grads is not None and not single:
                grads.add(grad.view(-1, vocab), h, head, slice(first, last))
        group = replace(
            views, labels=views.labels[start:stop], wrong=views.wrong[start:stop], scale=views.scale[start:stop]
        )
        if validate:
            _check_base_finite(stats, group, cfg.ignore_index)
        stage = second_stage(
            stats,
            saliency,
            group,
            sample_ids[start:stop],
            correct,
            hidden[start:stop] if clusters else None,
            cfg,
            reduction,
            validate,
        )
        factor[start:stop] = stage.factor
        losses.append(stage.loss)
        per_rows.append(stage.per_row)
        if grads is None:
            continue
        if single:
            grad = grad.view(-1, vocab)
            if stage.rows.numel():
                rescale_rows(grad, stage.factor, stage.rows, backend)
            grads.add(grad, h, head, slice(start, stop))
        elif stage.rows.numel():
            _fix_rows(hidden, head, views, cfg, backend, rows_per_chunk, grads, stage.rows + start, factor)
    loss = torch.cat(losses) if reduction == "none" else torch.stack(losses).sum()
    per_row = {name: torch.cat([p[name] for p in per_rows]) for name in DETAIL_FIELDS}
    return _Forward(loss, per_row, factor)


def _backward_pass(hidden, head: _Head, views: Views, cfg, backend, rows_per_chunk, grads: _Grads, row_factor) -> None:
    """Fold every chunk's provisional gradient times its rows' ``row_factor`` [N] into ``grads``."""
    n, vocab = hidden.shape[0], head.weight.shape[0]
    for start in range(0, n, rows_per_chunk):
        stop = min(start + rows_per_chunk, n)
        h = hidden[start:stop]
        _, _, grad = first_stage(views.rows(start, stop, head.logits(h)), cfg, backend, True)
        grad = grad.view(-1, vocab).mul_(row_factor[start:stop, None].to(grad.dtype))
        grads.add(grad, h, head, slice(start, stop))
        del grad  # before the next chunk's logits exist


def _fix_rows(hidden, head: _Head, views: Views, cfg, backend, rows_per_chunk, grads: _Grads, rows, factor) -> None:
    """Apply the second stage's ``factor`` [N] to the gradients of the rows ``rows`` [k]."""
    if grads.hidden is not None:
        grads.hidden.index_copy_(0, rows, grads.hidden[rows] * factor[rows, None].to(grads.hidden.dtype))
    if grads.weight is None and grads.bias is None:
        return
    for start in range(0, rows.numel(), rows_per_chunk):
        index = rows[start : start + rows_per_chunk]
        h = hidden[index]
        _, _, grad = first_stage(_select(views, index, head.logits(h)), cfg, backend, True)
        grad = grad.view(index.numel(), -1) * (factor[index] - 1)[:, None].to(grad.dtype)
        grads.add(grad, h, head, None)
        del grad  # before the next chunk's logits exist


def _check_base_finite(stats: torch.Tensor, views: Views, ignore_index: int) -> None:
    valid = views.labels != ignore_index
    if bool((valid & ~torch.isfinite(stats[0])).any()):
        raise ValueError(
            "the base logits hidden @ weight.T (+ bias) are non-finite (NaN or inf) in a labelled row: "
            "check hidden, weight and bias"
        )


class NLFTLinearLossFunction(torch.autograd.Function):
    """The NLFT loss of ``hidden @ weight.T + bias``, chunked over rows.

    Returns the loss and the per-row details (non-differentiable, ``DETAIL_FIELDS`` order).
    For reductions to a scalar, forward computes and stores the gradients of hidden [N, D],
    weight [V, D] and bias [V] and backward scales them by ``grad_output``; for ``"none"``,
    backward recomputes them with the per-row ``grad_output``. ``train`` is the caller's grad
    mode: forward runs with grad mode off, so it cannot tell whether a backward can follow.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, views, sample_ids, correct, cfg, reduction, backend, validate, rows, clusters, train
    ):
        want = tuple(train and need for need in ctx.needs_input_grad[:3])
        grads = _Grads(hidden, weight, bias, want) if any(want) and reduction != "none" else None
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
                validate,
                rows,
                clusters,
                grads,
            )
        ctx.reduction = reduction
        if reduction == "none":
            ctx.views, ctx.cfg, ctx.backend, ctx.rows, ctx.want = views, cfg, backend, rows, want
            ctx.save_for_backward(hidden, weight, bias, result.factor)
        elif grads is not None:
            # Keep the gradients in the parameters' dtypes between forward and backward.
            ctx.save_for_backward(
                grads.hidden,
                None if grads.weight is None else grads.weight.to(weight.dtype),
                None if grads.bias is None else grads.bias.to(bias.dtype),
            )
        else:
            ctx.save_for_backward(None, None, None)
        details = tuple(result.per_row[name] for name in DETAIL_FIELDS)
        ctx.mark_non_differentiable(*details)
        return (result.loss, *details)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_grad_details):
        none = (None,) * 10
        if ctx.reduction != "none":
            grads = saved_grads(ctx)
            for grad in grads:  # in place: no second [V, D] weight gradient at the peak
                if grad is not None:
                    scale_saved_grad(ctx, grad, grad_loss)
            return (*grads, *none)
        hidden, weight, bias, factor = ctx.saved_tensors
        grads = _Grads(hidden, weight, bias, ctx.want)
        row_factor = factor * grad_loss.reshape(-1).to(factor.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            head = _Head.of(weight, bias)
            _backward_pass(hidden, head, ctx.views, ctx.cfg, ctx.backend, ctx.rows, grads, row_factor)
        return (
            grads.hidden,
            None if grads.weight is None else grads.weight.to(weight.dtype),
            None if grads.bias is None else grads.bias.to(bias.dtype),
            *none,
        )


# ---------------------------------------------------------------------------------------------
# Input checks shared by both public functions; nothing is computed before they pass.


def _checked_linear(hidden, weight, bias, chunk_size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check the linear inputs; returns them cast to the autocast dtype inside ``torch.autocast``
    (the matmuls then run in it, as ``F.linear`` would), so mixed dtypes are fine there."""
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor (the LM head, [V, D]), got {type(weight).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ValueError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D [V, D] tensor (the LM head), got shape {tuple(weight.shape)}")
    if hidden.dim() not in (2, 3) or hidden.numel() == 0:
        raise ValueError(f"hidden must be a non-empty [B, T, D] or [N, D] tensor, got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden and weight must share the hidden size D: hidden has D={hidden.shape[-1]}, "
            f"weight [V, D] has D={weight.shape[1]}"
        )
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},), one entry per vocabulary row of weight, "
                f"got {tuple(bias.shape)}"
            )
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must have the same dtype")
    return hidden, weight, bias


def _logits_proxy(hidden: torch.Tensor, vocab: int) -> torch.Tensor:
    """A zero-byte tensor shaped like the logits [*hidden.shape[:-1], V], for the core op's checks."""
    return hidden.new_empty(()).expand(*hidden.shape[:-1], vocab)


def _acc_size(weight: torch.Tensor) -> int:
    """Bytes per logit of a chunk: the logits are in ACC whatever the input dtype."""
    return torch.empty((), dtype=acc_dtype(weight.dtype)).element_size()


def _flat(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1])


def nlft_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    correct: torch.Tensor,
    *,
    standard: torch.Tensor,
    judge: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: NLFTConfig = _DEFAULT_CONFIG,
    reduction: str = "sample_mean",
    sample_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_details: bool = False,
    backend: str = "auto",
    validate: bool = True,
    vocab_parallel_group=None,
):
    """The NLFT loss of the base view's logits ``hidden @ weight.T + bias``, never materialised.

    Equals ``nlft_loss(hidden @ weight.T + bias, labels, correct, standard=..., judge=...,
    hidden_states=hidden, ...)`` in value and in the gradients of ``hidden``, ``weight`` and
    ``bias``: saliency clusters walk ``hidden`` unless ``config.cluster_criterion == "off"``.

    hidden: [B, T, D] (or flat rows [N, D] with ``sample_ids``) fp32/bf16/fp16, the base view's
      final hidden state; row ``[b, t]`` predicts ``labels[b, t]``.
    weight: [V, D] the LM head (tied embeddings are fine), same dtype as ``hidden``; bias: [V].
    labels, correct, standard, judge, sample_ids, reduction, return_details, backend, validate:
      as in :func:`nlft_loss`; pass the teacher views as [B, T] label log-probs
      (:func:`linear_token_logprobs`) to keep their logits out of memory too.
    chunk_size: rows per chunk; default from N, V and free memory (:func:`chunk_rows_for`):
      as many rows as fit in min(1 GiB on CUDA or 128 MiB elsewhere, free memory / 4), and
      off CUDA at most D / 2, a multiple of 64 when more than 64 fit, balanced so the last
      chunk is not a sliver. Peak
      extra memory is about ``chunk_size * V * 16`` bytes (float32 logits and gradient, and two
      float32 temporaries) plus the gradients (hidden [N, D]; weight [V, D] and bias
      accumulated in float32 in place, then cast to their dtype); 16-bit inputs on a device
      without float32-output 16-bit matmuls (the CPU) add a float32 copy of ``weight``.

    Under ``torch.compile`` it traces as one custom op (``nlft_kernels.ops.custom_ops``), with
    ``validate`` off.

    vocab_parallel_group: the head's rows are split over this process group (Megatron's layout:
      ``weight`` [V / P, D] and ``bias`` are this rank's rows [r * V / P, (r + 1) * V / P);
      ``hidden`` and labels are the same on every rank). The logits shard [N, V / P] is
      materialised (float32), not chunked, and the hidden gradient is all-reduced over the
      group in backward (see ``nlft_kernels.ops.vocab_parallel``).
    """
    compiling = torch.compiler.is_compiling()
    validate = validate and not compiling
    if not isinstance(config, NLFTConfig):
        raise ValueError(f"config must be an NLFTConfig, got {type(config).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    hidden, weight, bias = _checked_linear(hidden, weight, bias, chunk_size)
    if vocab_parallel_group is not None:
        from nlft_kernels.ops.nlft_loss import nlft_loss
        from nlft_kernels.ops.vocab_parallel import linear_logits

        logits = linear_logits(_flat(hidden), weight, bias, vocab_parallel_group)
        logits = logits.view(*hidden.shape[:-1], -1)
        return nlft_loss(
            logits, labels, correct, standard=standard, judge=judge, config=config, reduction=reduction,
            sample_ids=sample_ids, hidden_states=hidden, return_details=return_details, validate=validate,
            vocab_parallel_group=vocab_parallel_group,
        )  # fmt: skip
    proxy = _logits_proxy(hidden, weight.shape[0])
    check_logits(proxy, "hidden @ weight.T")
    labels = check_labels(labels, proxy, config.ignore_index, validate)
    sample_ids, correct = _check_samples(proxy, labels, correct, sample_ids, hidden.dim() == 2, validate)
    if not compiling:  # the op resolves it while compiling
        backend = resolve_backend(backend, hidden.device)
    acc = acc_dtype(hidden.dtype)
    wrong_rows = ~correct[sample_ids]
    standard_t, standard_mode = _teacher(standard, "standard", proxy, acc, validate)
    if judge is None:
        if validate and bool(wrong_rows.any()):
            raise ValueError("judge is required when any sample is wrong (correct has False entries)")
        judge_t, judge_mode = None, VIEW_NONE
    else:
        judge_t, judge_mode = _teacher(judge, "judge", proxy, acc, validate)
    flat_labels = labels.reshape(-1).contiguous()
    valid = flat_labels != config.ignore_index
    views = Views(
        base=proxy,  # never read: every chunk brings its own base logits
        standard=standard_t,
        standard_mode=standard_mode,
        judge=judge_t,
        judge_mode=judge_mode,
        labels=flat_labels,
        wrong=wrong_rows & valid if judge is not None else torch.zeros_like(valid),
        scale=row_scale(valid, sample_ids, correct.numel(), reduction, config.loss_scale, acc),
    )
    if compiling:  # free memory is read at run time, inside the op (rows 0: automatic)
        from nlft_kernels.ops.custom_ops import nlft_linear_loss_apply as apply

        rows = chunk_size or 0
    else:
        apply = NLFTLinearLossFunction.apply
        rows = chunk_size or chunk_rows_for(
            flat_labels.numel(), weight.shape[0], _acc_size(weight), hidden.device, dim=weight.shape[1]
        )
    loss, *details = apply(
        _flat(hidden),
        weight,
        bias,
        views,
        sample_ids,
        correct,
        config,
        reduction,
        backend,
        validate,
        rows,
        config.cluster_criterion != "off",
        torch.is_grad_enabled(),
    )
    if reduction == "none":
        loss = loss.view(labels.shape)
    if not return_details:
        return loss
    return loss, NLFTDetails(*(d.view(labels.shape) for d in details))


@torch.no_grad()
def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    vocab_parallel_group=None,
) -> torch.Tensor:
    """log p(label) under ``hidden @ weight.T + bias``, chunked: for the teacher views.

    hidden: [B, T, D] or [N, D] fp32/bf16/fp16; weight: [V, D]; bias: [V] or None; labels:
    [B, T] or [N] int64. Returns float32 log-probs shaped like ``labels`` (0 at
    ``ignore_index``), without gradient, from float32 logits whatever the input dtype. Peak
    extra memory: a [chunk_size, V] float32 logits chunk, and for 16-bit inputs on a device
    without float32-output 16-bit matmuls (the CPU) a float32 copy of ``weight``.
    """
    hidden, weight, bias = _checked_linear(hidden, weight, bias, chunk_size)
    if vocab_parallel_group is not None:  # weight: this rank's rows (see nlft_linear_loss)
        from nlft_kernels.ops.vocab_parallel import global_vocab, linear_token_logprobs_vocab_parallel

        proxy = _logits_proxy(hidden, global_vocab(weight.shape[0], vocab_parallel_group))
        labels = check_labels(labels, proxy, ignore_index, validate)
        return linear_token_logprobs_vocab_parallel(hidden, weight, labels, bias, ignore_index, vocab_parallel_group)
    proxy = _logits_proxy(hidden, weight.shape[0])
    check_logits(proxy, "hidden @ weight.T")
    if torch.compiler.is_compiling():  # one custom op, unvalidated (see nlft_kernels.ops.custom_ops)
        from nlft_kernels.ops.custom_ops import linear_token_logprobs_op

        labels = check_labels(labels, proxy, ignore_index, validate=False)
        out = linear_token_logprobs_op(
            _flat(hidden), weight, bias, labels.reshape(-1), ignore_index, chunk_size or 0, backend
        )
        return out.view(labels.shape)
    labels = check_labels(labels, proxy, ignore_index, validate)
    backend = resolve_backend(backend, hidden.device)
    flat, flat_labels = _flat(hidden), labels.reshape(-1)
    n = flat_labels.numel()
    rows = chunk_size or chunk_rows_for(n, weight.shape[0], _acc_size(weight), hidden.device, dim=weight.shape[1])
    out = torch.empty(n, dtype=acc_dtype(hidden.dtype), device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        head = _Head.of(weight, bias)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            # No name holds the logits: they are freed before the next chunk's exist.
            out[start:stop] = token_logprobs(
                head.logits(flat[start:stop]), flat_labels[start:stop], ignore_index, backend, validate=False
            )
    if validate and not bool(torch.isfinite(out).all()):
        raise ValueError(
            "the logits hidden @ weight.T (+ bias) are non-finite (NaN or inf) in a labelled row: "
            "check hidden, weight and bias"
        )
    return out.view(labels.shape)
