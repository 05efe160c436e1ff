"""The chunked passes of the linear NLFT loss (``nlft_linear_loss``): per chunk of rows, the
logits ``[c, V]`` are one matmul (``Head``), a backend's row pass turns them into the label
statistics and the provisional gradient ``G_c``, and two more matmuls fold ``G_c`` into the
gradients of ``hidden`` and of the head (``Grads``). See ``nlft_linear_loss.py`` for the
chunking of samples and the fix-up of the rows the second stage changes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch

from nlft_kernels.backends import implementation
from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.contracts import acc_dtype
from nlft_kernels.ops.inputs import DETAIL_FIELDS, Views, as_3d
from nlft_kernels.ops.stages import first_stage, rescale_rows, second_stage

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
    ``Grads.add`` hands G in float32 there), never a fresh [V, D] product per chunk."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.dtype == b.dtype and out_dtype_matmuls(acc.device, a.dtype) and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


@dataclass
class Head:
    """The LM head as the chunk matmuls take it: logits come out in ACC (float32 for 16-bit
    inputs) and the gradients fold in from an ACC logits gradient (``Grads.add``).

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
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Head:
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


class Grads:
    """The gradients being accumulated: hidden [N, D] (input dtype), weight [V, D] and bias [V]
    (float32 accumulators, float64 for float64 inputs); None where not wanted."""

    def __init__(self, hidden, weight, bias, want: tuple[bool, bool, bool]):
        acc = acc_dtype(weight.dtype)
        self.hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if want[0] else None
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want[1] else None
        self.bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want[2] else None

    def add(self, grad: torch.Tensor, hidden: torch.Tensor, head: Head, rows: slice | None) -> None:
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
class ForwardResult:
    """What the forward pass decides: the loss (per row [N] for ``"none"``), the details by
    field of :class:`NLFTDetails` ([N] each) and the factor [N] of each row's provisional gradient."""

    loss: torch.Tensor
    per_row: dict[str, torch.Tensor]
    factor: torch.Tensor


def forward_pass(
    hidden,
    head: Head,
    views: Views,
    sample_ids,
    correct,
    cfg,
    reduction,
    backend,
    validate,
    rows_per_chunk,
    clusters: bool,
    grads: Grads | None,
) -> ForwardResult:
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
    return ForwardResult(loss, per_row, factor)


def backward_pass(hidden, head: Head, views: Views, cfg, backend, rows_per_chunk, grads: Grads, row_factor) -> None:
    """Fold every chunk's provisional gradient times its rows' ``row_factor`` [N] into ``grads``."""
    n, vocab = hidden.shape[0], head.weight.shape[0]
    for start in range(0, n, rows_per_chunk):
        stop = min(start + rows_per_chunk, n)
        h = hidden[start:stop]
        _, _, grad = first_stage(views.rows(start, stop, head.logits(h)), cfg, backend, True)
        grad = grad.view(-1, vocab).mul_(row_factor[start:stop, None].to(grad.dtype))
        grads.add(grad, h, head, slice(start, stop))
        del grad  # before the next chunk's logits exist


def _fix_rows(hidden, head: Head, views: Views, cfg, backend, rows_per_chunk, grads: Grads, rows, factor) -> None:
    """Apply the second stage's ``factor`` [N] to the gradients of the rows ``rows`` [k]."""
    if grads.hidden is not None:
        grads.hidden.index_copy_(0, rows, grads.hidden[rows] * factor[rows, None].to(grads.hidden.dtype))
    if grads.weight is None and grads.bias is None:
        return
    for start in range(0, rows.numel(), rows_per_chunk):
        index = rows[start : start + rows_per_chunk]
        h = hidden[index]
        _, _, grad = first_stage(views.select(index, head.logits(h)), cfg, backend, True)
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


def acc_size(weight: torch.Tensor) -> int:
    """Bytes per logit of a chunk: the logits are in ACC whatever the input dtype."""
    return torch.empty((), dtype=acc_dtype(weight.dtype)).element_size()


def auto_chunk_rows(n_rows: int, weight: torch.Tensor) -> int:
    """The default rows per chunk of ``n_rows`` rows under the head ``weight`` [V, D]."""
    return chunk_rows_for(n_rows, weight.shape[0], acc_size(weight), weight.device, dim=weight.shape[1])


def flat_rows_2d(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1])


# ---------------------------------------------------------------------------------------------
# The whole passes, as the autograd Function and the custom op (ops/custom_ops.py) both run them.

GradsOut = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def grads_out(grads: Grads | None, weight: torch.Tensor, bias: torch.Tensor | None) -> GradsOut:
    """(hidden, weight, bias) gradients, the head's in the parameters' dtypes; None where not wanted."""
    if grads is None:
        return None, None, None
    return (
        grads.hidden,
        None if grads.weight is None else grads.weight.to(weight.dtype),
        None if grads.bias is None else grads.bias.to(bias.dtype),
    )


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


def linear_forward(hidden, weight, bias, p: NLFTLinearLossParams, want) -> tuple[ForwardResult, GradsOut]:
    """The forward pass over flat ``hidden`` [N, D]: its result and, for reductions to a scalar,
    the gradients in ``want`` (hidden, weight, bias); ``"none"`` computes them in backward."""
    grads = Grads(hidden, weight, bias, want) if any(want) and p.reduction != "none" else None
    with torch.autocast(hidden.device.type, enabled=False):
        result = forward_pass(
            hidden, Head.of(weight, bias), p.views, p.sample_ids, p.correct, p.cfg, p.reduction, p.backend,
            p.validate, p.rows, p.clusters, grads,
        )  # fmt: skip
    return result, grads_out(grads, weight, bias)


def linear_none_backward(
    hidden, weight, bias, views: Views, cfg: NLFTConfig, backend: str, rows: int, want, factor, grad_loss
) -> GradsOut:
    """The gradients in ``want`` of ``reduction="none"`` for the per-row upstream ``grad_loss``
    [N]: a second chunked pass, each row's provisional gradient times ``factor * grad_loss``."""
    grads = Grads(hidden, weight, bias, want)
    row_factor = factor * grad_loss.reshape(-1).to(factor.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        backward_pass(hidden, Head.of(weight, bias), views, cfg, backend, rows, grads, row_factor)
    return grads_out(grads, weight, bias)


@torch.no_grad()
def linear_label_logprobs(hidden, weight, bias, labels, ignore_index: int, rows: int, backend: str) -> torch.Tensor:
    """[N] label log-probs in ACC of flat ``hidden`` [N, D] under the head, ``rows`` at a time."""
    n = labels.numel()
    out = torch.empty(n, dtype=acc_dtype(hidden.dtype), device=hidden.device)
    label_logprobs = implementation(backend).label_logprobs
    with torch.autocast(hidden.device.type, enabled=False):
        head = Head.of(weight, bias)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            # No name holds the logits: they are freed before the next chunk's exist.
            lp, _ = label_logprobs(as_3d(head.logits(hidden[start:stop]), "logits"), labels[start:stop], ignore_index)
            out[start:stop] = lp
    return out
