"""Which implementation runs where, and why: the one backend registry.

Each backend name maps to its implementations of the four kernel contracts (``Backend``):
the NLFT row pass, backward's scaling of a stored gradient, the label log-probs, and the
gradient ``coef * (softmax - onehot)`` from a saved lse. Every op reaches them through
``implementation(name)``.

- ``triton``: the fused Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
- ``cuda``: the compiled CUDA row pass of ``nlft_kernels._C`` (CUDA tensors, CUDA builds); the
  extension has no other CUDA kernel: the gradient passes run in Triton, the log-probs in
  chunked torch.
- ``cpp``: the compiled C++ kernels of ``nlft_kernels._C`` (CPU tensors).
- ``torch``: the chunked PyTorch path (any device).

``resolve_backend`` turns a requested name into one that can run on the tensors' device, or
raises with the reason (``unavailable``); nothing falls back silently. ``backend="auto"``
takes the C++ kernel on the CPU when ``_C`` loads (else ``torch``) and, on CUDA tensors, the
entry of ``GPU_CHOICE`` for the shape (else ``GPU_DEFAULT``). A compiled extension that is
missing, stale or built against another torch never breaks ``import nlft_kernels``:
``backends()`` says what happened and ``auto`` picks another backend.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

# ``extension`` is looked up here at call time (tests replace it to simulate a missing build).
from nlft_kernels.extension import build_info, extension
from nlft_kernels.ops import extension_ops, kernels, torch_rows

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")

# The GPU kernel "auto" takes, by shape: entries (max rows N, max vocabulary V, backend), the
# first entry whose limits hold the shape wins; other shapes, and machines whose _C has no CUDA
# kernel, take GPU_DEFAULT. Fill it from `python -m benchmarks.bench_cpu_kernel --gpu` (CUDA
# against Triton per N and V). Triton stays the default until the CUDA kernel is measured faster.
GPU_CHOICE: tuple[tuple[int, int, str], ...] = ()
GPU_DEFAULT = "triton"


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_unavailable(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run the row kernels with these versions, or None.

    The kernels take loop bounds from memory (padded and ignored rows skip their sweeps); the
    interpreter of Triton < 3.7 turns such a bound, a one-element array, into an int with
    ``int(array)``, which NumPy >= 2.4 refuses (triton-lang/triton#9171, fixed in Triton 3.7)."""

    def major_minor(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", version)[:2])

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (
            f"cannot run under the interpreter of Triton {triton_version} with NumPy {numpy_version} "
            "(Triton < 3.7 converts one-element arrays to int, an error since NumPy 2.4): "
            "install numpy<2.4 or Triton >= 3.7 (torch >= 2.12)"
        )
    return None


def _cpp_unavailable() -> str | None:
    module, why = extension()
    return None if module is not None else why


def _cuda_unavailable() -> str | None:
    module, why = extension()
    if module is None:
        return why
    if not module.built_with_cuda():
        info = build_info() or {}
        why = info.get("reason", "").removeprefix("CPU kernel only: ")
        why = why or "CPU torch, no nvcc, or NLFT_SKIP_CUDA_BUILD=1"
        return f"nlft_kernels._C was built without CUDA ({why})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def gpu_choice(rows: int | None, vocab: int | None) -> str:
    """The GPU backend ``auto`` takes for ``rows`` x ``vocab`` logits (see ``GPU_CHOICE``)."""
    if rows is not None and vocab is not None:
        for max_rows, max_vocab, choice in GPU_CHOICE:
            if rows <= max_rows and vocab <= max_vocab:
                return choice if choice != "cuda" or _cuda_unavailable() is None else GPU_DEFAULT
    return GPU_DEFAULT


def unavailable(backend: str, device: torch.device) -> str | None:
    """Why the named ``backend`` cannot run on ``device`` (a phrase after ``backend='...'``), or None."""
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        return (
            f"needs CUDA tensors (got {device.type}); on the CPU set TRITON_INTERPRET=1 "
            "before importing triton, or use backend='torch'"
        )
    if backend == "triton" and device.type != "cuda" and kernels.INTERPRETED:
        versions = (importlib.metadata.version("triton"), importlib.metadata.version("numpy"))
        if (why := interpreter_unavailable(*versions)) is not None:
            return why
    if backend == "cpp":
        if device.type != "cpu":
            return f"needs CPU tensors, got {device.type}"
        if (why := _cpp_unavailable()) is not None:
            return f"is unavailable: {why}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"needs CUDA tensors, got {device.type}"
        if (why := _cuda_unavailable()) is not None:
            return f"is unavailable: {why}"
    return None


def resolve_backend(backend: str, device: torch.device, rows: int | None = None, vocab: int | None = None) -> str:
    """The implementation that computes on ``device``: ``"triton"``, ``"cuda"``, ``"cpp"`` or ``"torch"``.

    ``auto``: on CUDA tensors ``gpu_choice(rows, vocab)`` (Triton until the CUDA kernel is
    measured faster for a shape); on the CPU the C++ kernel when ``nlft_kernels._C`` loads, else
    the chunked torch path. A named backend that cannot run on ``device`` raises ValueError
    with the reason (``unavailable``). ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``
    (set before triton is imported).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return gpu_choice(rows, vocab)
        return "cpp" if device.type == "cpu" and _cpp_unavailable() is None else "torch"
    if (why := unavailable(backend, device)) is not None:
        raise ValueError(f"backend={backend!r} {why}")
    return backend


@dataclass(frozen=True)
class Backend:
    """The implementations of one backend, with the signatures of ``nlft_kernels.ops.kernels``:

    row_pass(views, cfg, compute_grad, out=None) -> (stats [3, N], saliency [N] bool, gradient
      or None; written into ``out`` when given);
    scale_rows(grad [R, V], factor [R]): grad[r] *= factor[r] in place (rows whose factor is 1
      skipped on the device where the backend can);
    label_logprobs(x [B, T, V], labels [N], ignore_index) -> (log p(label) [N], lse [N]);
    softmax_grad(x, labels, lse, coef, ignore_index, out) -> out = coef * (softmax(x) - onehot);
    label_logprobs_grad(x, labels, coef, ignore_index, out) -> (log p(label), lse), and ``out``
      as ``softmax_grad`` writes it, in one pass where the backend has the kernel.
    """

    name: str
    row_pass: Callable
    scale_rows: Callable
    label_logprobs: Callable
    softmax_grad: Callable
    label_logprobs_grad: Callable


REGISTRY: dict[str, Backend] = {
    "triton": Backend(
        "triton",
        kernels.row_pass,
        kernels.scale_rows,
        kernels.label_logprobs,
        kernels.softmax_grad,
        kernels.label_logprobs_grad,
    ),  # fmt: skip
    # The extension has a CUDA row pass only: the gradient passes of backward are Triton's
    # (they test each row's factor on the device), the label log-probs chunked torch.
    "cuda": Backend(
        "cuda",
        extension_ops.row_pass,
        kernels.scale_rows,
        torch_rows.label_logprobs,
        kernels.softmax_grad,
        kernels.label_logprobs_grad,
    ),  # fmt: skip
    "cpp": Backend(
        "cpp",
        extension_ops.row_pass,
        extension_ops.scale_rows,
        extension_ops.label_logprobs,
        extension_ops.softmax_grad,
        extension_ops.label_logprobs_grad,
    ),  # fmt: skip
    "torch": Backend(
        "torch",
        torch_rows.row_pass,
        torch_rows.scale_rows,
        torch_rows.label_logprobs,
        torch_rows.softmax_grad,
        torch_rows.label_logprobs_grad,
    ),  # fmt: skip
}


def implementation(backend: str) -> Backend:
    """The implementations of a resolved backend (``resolve_backend``'s result, not ``"auto"``)."""
    if backend not in REGISTRY:
        raise ValueError(f"backend must be one of {tuple(REGISTRY)} once resolved, got {backend!r}")
    return REGISTRY[backend]
