"""The traffic model: the bytes each pass moves for one row, by buffer, forward and backward.

A unit is one [V] row of the logits dtype (N·V·e bytes for a batch). What a GPU moves through
DRAM for ``nlft_loss`` forward+backward with ``grad_output == 1``, per labelled row:

- gradient written in forward (``GradStore.FORWARD``: float32, bfloat16): every logits view
  read once, the gradient written once: **4 units with three logit views, 2 with one** (the
  teachers as [N] log-probs). The row pass's second sweep reads the base row again to write the
  gradient; the same program read it microseconds before, so on a GPU that re-read is served
  from L2 (``base_reread``, counted apart; Triton's interpreter counts it as a load like any
  other). Backward's pass touches a row only when its total factor (the per-sample fix-up times
  ``grad_output``) is not 1: a factor of 0 writes the row once (zeros, nothing read), any other
  reads and writes it once; ``grad_output != 1`` makes that every row (+2 units).
- gradient written in backward (``GradStore.BACKWARD``: float16, vocabulary-parallel shards):
  forward reads every view once, backward reads the base row once more from DRAM and writes
  the gradient once: 5 units with three views, 3 with one, whatever ``grad_output``.

The label entry of each logits view is one more element per row; per-row scalars (label, flags,
scale, statistics: under 40 bytes) are not counted. tests/ops/test_traffic.py counts every load
and store of an interpreter run and checks them against these functions, which benchmarks
divide by time for GB/s.
"""

from __future__ import annotations

import torch

from nlft_kernels.ops.contracts import GradStore

# Buffers whose bytes a GPU is expected to serve from L2 rather than DRAM.
L2_BUFFERS = ("base_reread",)


def nlft_forward_traffic(
    vocab: int,
    logits_dtype: torch.dtype,
    *,
    standard_logits: bool,
    judge_logits: bool,
    wrong: bool,
    store: GradStore,
) -> dict[str, int]:
    """Bytes of ``nlft_loss``'s forward for one labelled row, by buffer: ``base`` (the first sweep
    and the label entry), ``base_reread`` (the row pass's gradient sweep, FORWARD only: L2 on a
    GPU), the standard row when given as logits, the judge row on rows of wrong samples when
    given as logits, and the gradient row written (FORWARD; its dtype is the logits')."""
    e = logits_dtype.itemsize
    in_forward = store == GradStore.FORWARD
    return {
        "base": (vocab + 1) * e,
        "base_reread": vocab * e if in_forward else 0,
        "standard": (vocab + 1) * e if standard_logits else 0,
        "judge": (vocab + 1) * e if judge_logits and wrong else 0,
        "grad": vocab * e if in_forward else 0,
    }


def nlft_backward_traffic(vocab: int, logits_dtype: torch.dtype, *, store: GradStore, factor: float) -> dict[str, int]:
    """Bytes of ``nlft_loss``'s backward for one row whose total factor is ``factor`` (FORWARD:
    the per-sample fix-up times ``grad_output``; BACKWARD: the row's gradient coefficient times
    ``grad_output``, 0 at padding), by buffer: ``base`` read (BACKWARD), ``grad_read`` and
    ``grad_write``. A factor of 1 (FORWARD) moves nothing; a factor of 0 writes zeros unread."""
    row = vocab * logits_dtype.itemsize
    if store == GradStore.FORWARD:
        return {"base": 0, "grad_read": row if factor not in (0.0, 1.0) else 0, "grad_write": row if factor != 1 else 0}
    if store == GradStore.BACKWARD:
        return {"base": row if factor != 0 else 0, "grad_read": 0, "grad_write": row}
    return {"base": 0, "grad_read": 0, "grad_write": 0}


def dram_units(forward: dict[str, int], backward: dict[str, int], vocab: int, logits_dtype: torch.dtype) -> float:
    """The DRAM traffic of a row on a GPU in units of one [V] row (``L2_BUFFERS`` left out)."""
    moved = sum(v for k, v in forward.items() if k not in L2_BUFFERS) + sum(backward.values())
    return moved / (vocab * logits_dtype.itemsize)


def token_logprobs_traffic(vocab: int, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """Bytes of the label log-prob kernels for one labelled row, by kernel and buffer: forward
    reads the row once and its label entry; backward reads the row once and writes its
    gradient row once (in the logits dtype)."""
    e = dtype.itemsize
    return {"forward": {"logits": (vocab + 1) * e}, "backward": {"logits": vocab * e, "grad": vocab * e}}


def weighted_ce_traffic(vocab: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of ``token_weighted_cross_entropy``'s forward for one labelled row whose weight is
    not 0, gradient written in forward (float32, bfloat16): the row read once with its label
    entry, re-read by the same program's gradient sweep (``base_reread``: L2 on a GPU), the
    gradient row written once; with ``grad_output == 1`` backward moves nothing: 2 units of
    DRAM traffic."""
    e = dtype.itemsize
    return {"base": (vocab + 1) * e, "base_reread": vocab * e, "grad": vocab * e}
