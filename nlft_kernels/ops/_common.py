"""Input handling shared by the ops: row views of logits, label checks, chunks."""

from __future__ import annotations

from collections.abc import Iterator

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# Rows of a [B, T, V] tensor are addressed as b * stride_b + t * stride_t, so a sliced view
# such as ``logits[:, :-1]`` is read in place instead of being copied to [B*T, V].


def as_3d(x: torch.Tensor, name: str) -> torch.Tensor:
    """[N, V] -> [1, N, V]; [B, T, V] as is; unit stride along V (copies only when it is not)."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, T, V] or [N, V], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def check_logits(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() not in (2, 3) or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty [B, T, V] or [N, V] tensor, got shape {tuple(x.shape)}")


def check_labels(labels: torch.Tensor, logits: torch.Tensor, ignore_index: int, validate: bool) -> torch.Tensor:
    """Labels shaped like ``logits`` without V, integer, on its device; returns them as int64."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {logits.device}")
    labels = labels.long()
    if validate:
        vocab = logits.shape[-1]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            value = labels[bad][0].item()
            raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; found {value}")
    return labels


def row_chunks(x: torch.Tensor, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, [r, V] rows) of a [B, T, V] tensor, ``rows`` at a time, without copying."""
    batch, steps, vocab = x.shape
    try:
        flat = x.view(batch * steps, vocab)
    except RuntimeError:
        flat = None
    if flat is not None:
        for start in range(0, batch * steps, rows):
            yield start, flat[start : start + rows]
        return
    for b in range(batch):
        for start in range(0, steps, rows):
            yield b * steps + start, x[b, start : start + rows]


def chunk_rows(vocab: int, target_bytes: int = 64 << 20) -> int:
    """Rows per chunk of the torch path: a few float32 [rows, V] temporaries of ``target_bytes``."""
    return max(1, target_bytes // (4 * vocab))
