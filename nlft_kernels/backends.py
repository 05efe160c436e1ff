"""Which implementation runs where, and why."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The implementation that computes on ``device``: ``"triton"`` or ``"torch"``.

    ``auto``: Triton for CUDA tensors, the chunked torch path otherwise. ``triton`` on CPU
    tensors needs ``TRITON_INTERPRET=1`` (set before triton is imported).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device.type}); on the CPU set TRITON_INTERPRET=1 "
            "before importing triton, or use backend='torch'"
        )
    return backend


def backends() -> dict[str, str]:
    """Each backend and whether it can run here, with the reason when it cannot."""
    cuda = torch.cuda.is_available()
    if cuda:
        triton_state = "available (CUDA)"
    elif triton_interpreted():
        triton_state = "available on CPU tensors through the Triton interpreter (slow)"
    else:
        triton_state = "unavailable: no CUDA device (set TRITON_INTERPRET=1 to interpret on the CPU)"
    return {"triton": triton_state, "torch": "available (chunked PyTorch, any device)"}
