"""Launch configuration of the Triton kernels: one function per kernel family.

The same functions feed the launches in ``ops/``, the tests and the ahead-of-time compile
(``tests/ops/compile_kernels.py``), so what is compiled and tested is what runs.

A kernel family streams ``streams`` rows of length V at once (the base logits, plus the
standard and judge logits when they are given as logits); each stream keeps one float32 (or
float64) tile of ``BLOCK_V`` live. The tile is a power of two (``tl.arange`` requires it),
chosen so that the live tiles of all streams fit a register budget per program, and no larger
than the vocabulary. ``TUNED`` overrides the rule for measured shapes: it is filled from GPU
measurements (``python -m benchmarks.gpu_suite``) and empty until a GPU has been lent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nlft_kernels.ops.contracts import acc_dtype

# Kernel families: the NLFT row pass (`_nlft_fwd_kernel`, 1-3 streams), the label log-probs
# forward and backward (`_token_logprobs_kernel` / `_bwd_kernel`, 1 stream) and the row scaling
# of the per-sample fix-up (`_scale_rows_kernel`, 1 stream).
FAMILIES = ("row_pass", "token_logprobs", "scale_rows")

# Live elements per program across all streams: 16K for 16-bit inputs (converted to float32
# tiles, half the bytes in flight), 8K for float32, 2K for float64 (two registers an element;
# float64 is for gradcheck, not speed).
_ELEMENT_BUDGET = {2: 16384, 4: 8192, 8: 2048}
# Live tile elements per thread across the streams before the warps are raised: past it ptxas
# spilled (three bf16/fp16 streams of 4096 at 8 warps: 48 live elements; three float64 streams
# of 512 at 4 warps: 12, through a 4-byte spill in a libdevice call).
_LIVE_PER_THREAD = {4: 32, 8: 8}
MIN_BLOCK_V = 128
MAX_BLOCK_V = 16384


@dataclass(frozen=True)
class LaunchConfig:
    """``BLOCK_V`` (a power of two) and ``num_warps`` of one launch."""

    block_v: int
    num_warps: int

    def __post_init__(self) -> None:
        if self.block_v < 1 or self.block_v & (self.block_v - 1):
            raise ValueError(f"BLOCK_V must be a power of two, got {self.block_v}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two up to 32, got {self.num_warps}")


def vocab_bucket(vocab: int) -> int:
    """The power of two at or above ``vocab``: the key of ``TUNED`` (e.g. 50257 -> 65536)."""
    return 1 << max(vocab - 1, 0).bit_length()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# (family, vocab bucket, streams, dtype name) -> measured best LaunchConfig. Filled from a GPU
# run; every entry is compiled by the AOT test like the rule's choices.
TUNED: dict[tuple[str, int, int, str], LaunchConfig] = {}


def _prev_power_of_2(x: int) -> int:
    return 1 << (max(x, 1).bit_length() - 1)


def heuristic_config(vocab: int, streams: int, dtype: torch.dtype) -> LaunchConfig:
    """The rule: the largest power-of-two tile whose ``streams`` live tiles fit the budget,
    at least ``MIN_BLOCK_V`` and at most the vocabulary's power of two; warps by tile size, raised
    until each thread holds at most ``_LIVE_PER_THREAD`` live elements (the AOT compile checks
    the result has no spills), at most 16."""
    budget = _ELEMENT_BUDGET[dtype.itemsize]
    per_stream = _prev_power_of_2(budget // max(streams, 1))
    block = max(MIN_BLOCK_V, min(vocab_bucket(vocab), per_stream, MAX_BLOCK_V))
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    live = _LIVE_PER_THREAD[8 if dtype == torch.float64 else 4]
    needed = vocab_bucket(-(-block * streams // (32 * live)))
    return LaunchConfig(block, min(max(num_warps, needed), 16))


def launch_config(family: str, vocab: int, streams: int, dtype: torch.dtype) -> LaunchConfig:
    """The configuration a ``family`` kernel launches with for rows of ``vocab`` entries,
    ``streams`` rows read at once and logits of ``dtype``: ``TUNED`` if measured, else the rule."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not 1 <= streams <= 3:
        raise ValueError(f"streams must be 1, 2 or 3, got {streams}")
    tuned = TUNED.get((family, vocab_bucket(vocab), streams, _dtype_name(dtype)))
    return tuned if tuned is not None else heuristic_config(vocab, streams, dtype)


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the base view's gradient rows for logits of ``dtype``.

    float16 gets float32: the stored rows are multiplied by ``grad_output`` only in backward,
    and GradScaler's factor (2**16) arrives there; before it, entries below 6e-8 (a softmax
    of 1e-6 times a row scale of 1e-2) would underflow to 0 in float16. Autograd casts the
    returned gradient to float16 after the multiplication. Other dtypes keep theirs (bfloat16
    has float32's range).
    """
    return torch.float32 if dtype == torch.float16 else dtype


def row_pass_buffers(base: torch.Tensor, rows: int, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row pass's outputs but saliency, as every backend allocates them: stats [3, N] in ACC
    and, with ``compute_grad``, the gradient shaped like ``base`` in ``grad_dtype``."""
    stats = torch.empty(3, rows, dtype=acc_dtype(base.dtype), device=base.device)
    grad = torch.empty(base.shape, dtype=grad_dtype(base.dtype), device=base.device) if compute_grad else None
    return stats, grad


# ---------------------------------------------------------------------------------------------
# Traffic model: the bytes each kernel moves through device memory for one labelled row, by
# buffer, as its docstring states (tests/ops/test_traffic.py counts them in an interpreter run).


def row_pass_traffic(
    vocab: int,
    logits_dtype: torch.dtype,
    *,
    standard_logits: bool,
    judge_logits: bool,
    wrong: bool,
    grad_type: torch.dtype | None,
) -> dict[str, int]:
    """Bytes of ``_nlft_fwd_kernel`` for one labelled row: the base row twice with a gradient
    (once without), the standard row once when given as logits, the judge row once on rows of
    wrong samples when given as logits, the gradient row written once (``grad_type``, None
    without a gradient); one label entry per logits view. Per-row scalars (label, flags,
    scale, statistics: under 40 bytes) are not counted."""
    e = logits_dtype.itemsize
    sweeps = 2 if grad_type is not None else 1
    return {
        "base": (sweeps * vocab + 1) * e,
        "standard": (vocab + 1) * e if standard_logits else 0,
        "judge": (vocab + 1) * e if judge_logits and wrong else 0,
        "grad": vocab * grad_type.itemsize if grad_type is not None else 0,
    }


def token_logprobs_traffic(vocab: int, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """Bytes of the label log-prob kernels for one labelled row, by kernel and buffer: forward
    reads the row once and its label entry; backward reads the row once and writes its
    gradient row once (in the logits dtype)."""
    e = dtype.itemsize
    return {"forward": {"logits": (vocab + 1) * e}, "backward": {"logits": vocab * e, "grad": vocab * e}}


# ---------------------------------------------------------------------------------------------
# The saliency-cluster walk (``ops/cluster_kernels.py``): one program per sample holds the
# running centre [D] and one hidden row [D] in registers, so its tile spans the hidden size.

# Largest hidden size the walk holds in one tile: 16384 (Llama-3-405B's D) in float32, 4096 in
# float64 (for gradcheck); larger heads take the torch walk.
MAX_CLUSTER_BLOCK_D = {4: 16384, 8: 4096}


def cluster_walk_config(dim: int, dtype: torch.dtype) -> LaunchConfig | None:
    """``BLOCK_D`` (as ``block_v``: the power of two at or above ``dim``, at least 16) and warps
    of ``_cluster_walk_kernel`` for hidden states [N, ``dim``] of ``dtype``: two live tiles
    (centre, row) of at most ``_LIVE_PER_THREAD`` elements per thread each (half that in
    float64), at most 16 warps; None when ``dim`` is beyond ``MAX_CLUSTER_BLOCK_D``. The AOT
    compile for sm_80/sm_90 of every dtype at D = 8 .. 16384 has no spills."""
    acc_size = 8 if dtype == torch.float64 else 4
    block = max(16, vocab_bucket(dim))
    if block > MAX_CLUSTER_BLOCK_D[acc_size]:
        return None
    live = _LIVE_PER_THREAD[acc_size] // (2 if acc_size == 8 else 1)
    return LaunchConfig(block, min(max(1, vocab_bucket(-(-block // (32 * live)))), 16))
