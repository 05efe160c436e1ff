"""The fused linear loss moves the bytes through [c, V]-sized buffers that its model states
(``linear_chunks.chunk_traffic``): counted in a run of the Triton backend under the interpreter.

Two counters run together over one ``nlft_linear_loss`` forward and backward:

- the interpreter's loads and stores (``count_bytes`` of tests/ops/test_traffic.py) for the
  row kernels (the NLFT row pass, the row scaling of the per-sample stage);
- a ``TorchDispatchMode`` for every torch op that reads or writes a logits-sized tensor ([c, V]
  or [1, c, V], or G.T [V, c]): the GEMMs, and anything else that would touch a chunk (a cast,
  a scaling, a sum). A GEMM is counted by the ideal of a tiled GEMM: it reads each operand and
  writes its result once, so its [c, V] operand or result counts its size.

The mode keeps every logits-sized tensor it sees alive, so that no later buffer reuses a
chunk's memory and the interpreter's addresses are attributed to chunk buffers exactly. The
hidden size (24) is no chunk's row count, so [V, D] tensors (the head, the weight gradient)
never count as logits-sized.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from nlft_kernels import NLFTConfig, nlft_linear_loss
from nlft_kernels.ops.linear_chunks import chunk_traffic, out_dtype_matmuls
from tests.conftest import NEEDS_TRITON
from tests.ops.test_nlft_linear_loss import make_linear_case, params, teacher
from tests.ops.test_traffic import count_bytes, interpreter

DIM = 24
# Ops that write their first argument without reading it.
WRITE_ONLY = {"aten::copy_", "aten::fill_", "aten::zero_"}


class LogitsOps(TorchDispatchMode):
    """Bytes that torch ops read and write in logits-sized tensors, by op name; ``buffers``:
    every logits-sized tensor seen (kept alive)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.read: collections.Counter[str] = collections.Counter()
        self.written: collections.Counter[str] = collections.Counter()
        self.buffers: list[torch.Tensor] = []
        self.alive: list[torch.Tensor] = []

    def sized(self, t) -> bool:
        return (
            isinstance(t, torch.Tensor)
            and t.dim() in (2, 3)
            and self.vocab in t.shape[-2:]
            and DIM not in t.shape[-2:]
            and t.numel() > self.vocab
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "nlft_kernels":
            # The package's own ops (ops/library.py): their body runs under the mode, so that the
            # GEMMs and casts inside are counted, not the op as one opaque call.
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # Inside those ops (below autograd), composite ops reach the mode whole (matmul,
            # to): counted by what they decompose into, as outside.
            with self:
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func._schema.name
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.buffers += [t for t in tensors + tree_leaves(out) if self.sized(t)]
        # Every tensor made under the mode lives to the end: the kernels' stores are attributed
        # by address at the end, and a freed small output (a row's statistics) whose memory a
        # later logits buffer took would count as a store into it (seen: 8 bytes, once).
        self.alive += [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if func.is_view:
            return out
        written_args = set()
        bound = _bind(func, args, kwargs)
        for arg in func._schema.arguments:
            value = bound.get(arg.name)
            for t in tree_leaves(value):
                if not self.sized(t):
                    continue
                writes = arg.alias_info is not None and arg.alias_info.is_write
                if writes:
                    written_args.add(id(t))
                    self.written[name] += _nbytes(t)
                if not writes or (name.endswith("_") and name not in WRITE_ONLY and arg.name != "out"):
                    self.read[name] += _nbytes(t)
        if not written_args:
            storages = {t.untyped_storage().data_ptr() for t in tensors}
            for t in tree_leaves(out):
                if self.sized(t) and t.untyped_storage().data_ptr() not in storages:
                    self.written[name] += _nbytes(t)
        return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bind(func, args, kwargs) -> dict:
    """The op's arguments by schema name."""
    bound = dict(kwargs)
    positional = [a for a in func._schema.arguments if not a.kwarg_only]
    for arg, value in zip(positional, args, strict=False):
        bound[arg.name] = value
    return bound


@contextlib.contextmanager
def count_linear_traffic(vocab: int):
    """(torch ops' logits bytes, the interpreter's loads and stores) of the block; the mode is
    off inside Triton launches (the interpreter's own copies of the arguments are no op of the
    code under test)."""
    executor = interpreter.GridExecutor
    launch = executor.__call__

    def unobserved(self, *args, **kwargs):
        with _disable_current_modes():
            return launch(self, *args, **kwargs)

    executor.__call__ = unobserved
    ops = LogitsOps(vocab)
    try:
        with count_bytes() as kernels, ops:
            yield ops, kernels
    finally:
        executor.__call__ = launch


def kernel_bytes(kernels, buffers: list[torch.Tensor], kind: str) -> int:
    """The interpreter's ``kind`` bytes ("load"/"store") in the distinct storages of ``buffers``."""
    distinct = {t.untyped_storage().data_ptr(): t for t in buffers}
    return sum(kernels.bytes(t, kind) for t in distinct.values())


# (vocabulary, rows per chunk): whole samples of 8 rows per chunk at V = 300 (one partial tile)
# and V = 128256 (Llama-3); 5 rows per chunk at V = 300 split every sample, so each sample goes
# through twice: once for its statistics, then with its per-sample factors in its rows' scale.
SHAPES = [(300, 16), (128_256, 16), (300, 5)]


@NEEDS_TRITON
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("vocab, chunk", SHAPES, ids=[f"V={v}-chunk={c}" for v, c in SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_linear_loss_moves_what_its_model_says(dtype, vocab, chunk, bias):
    """4 samples of 8 rows (padding, saliency of every kind, the 6% rule, clusters), teachers as
    log-probs, the Triton backend: forward and backward."""
    case = make_linear_case(dtype, seed=vocab % 997 + chunk + bias, batch=4, steps=8, vocab=vocab, dim=DIM, bias=bias)
    standard, judge = (teacher(case, view, "logprobs") for view in (case.standard, case.judge))
    with count_linear_traffic(vocab) as (ops, kernels):
        loss, details = nlft_linear_loss(
            case.hidden, case.weight, case.labels, case.correct, standard=standard, judge=judge, bias=case.bias,
            config=NLFTConfig(), chunk_size=chunk, backend="triton", return_details=True,
        )  # fmt: skip
        torch.autograd.grad(loss, params(case))
    rows = case.labels.numel()
    valid = int((case.labels != -100).sum())
    killed, cluster = details.killed, details.cluster & ~details.killed
    assert rows > valid and killed.any() and cluster.any() and details.unlikelihood.any()
    # Whole samples: one pass of scale_rows over the chunk's G applies the per-sample factors:
    # a cluster row's (neither 0 nor 1) read and written once more, a killed row's (0) written
    # as zeros unread, every other row (1) untouched. Split samples: every row goes through the
    # logits GEMM and a statistics-only read first (``split``), no scaling pass after.
    split = rows if chunk < case.labels.shape[1] else 0
    rescaled, zeroed = (0, 0) if split else (int(cluster.sum()), int(killed.sum()))

    e = dtype.itemsize
    model = chunk_traffic(vocab, dtype, bias=bias, out_dtype_matmul=out_dtype_matmuls(torch.device("cpu"), dtype))
    row_pass = model["row_pass"] - vocab * e  # the reads of a labelled row; its write is vocab * e
    statistics = (vocab + 1) * e  # a labelled row read once, and its label entry
    # The row kernels: every labelled row read twice (and its label entry), every row's gradient
    # written once over its logits (zeros at padding), the per-sample factors as above.
    loads = valid * row_pass + (valid if split else 0) * statistics + rescaled * vocab * e
    assert kernel_bytes(kernels, ops.buffers, "load") == loads
    assert kernel_bytes(kernels, ops.buffers, "store") == (rows + rescaled + zeroed) * vocab * e
    # The GEMMs (and the bias sum, and on a device without float32-output 16-bit GEMMs the cast
    # of G): each stage once per row, the logits GEMM once more for split samples, nothing else.
    gemms = sum(model[stage] for stage in ("logits", "dx", "dw", "bias"))
    moved = sum(ops.read.values()) + sum(ops.written.values())
    assert moved == rows * gemms + split * model["logits"], (ops.read, ops.written)
    gemm_ops = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::_to_copy", "aten::sum"}
    assert set(ops.read) | set(ops.written) <= gemm_ops

    # Per logit of a labelled row: 6 e (+ e / V for its label entry; + e with a bias, whose sum
    # reads G once more) on a GPU, where the dW GEMM reads G in the input dtype: at V = 128256
    # in bfloat16, 12 B (plus 2 / V) without a bias (LM heads: Llama, Qwen, Mistral, Gemma),
    # 14 B (plus 2 / V) with one, against the 14.
    gpu = chunk_traffic(vocab, dtype, bias=bias, out_dtype_matmul=True)
    per_logit = sum(gpu.values()) / vocab
    assert per_logit == (6 + bias) * e + e / vocab
    if dtype == torch.bfloat16 and vocab == 128_256:
        assert per_logit <= 14 + bias * e / vocab
