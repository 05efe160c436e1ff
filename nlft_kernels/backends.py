"""Which implementation runs where, and why: the one backend registry.

Each backend name maps to its implementations of the three kernel contracts (``Backend``):
the NLFT row pass, the row scaling of the per-sample fix-up, and the label log-probs
(forward and backward). Every op reaches them through ``implementation(name)``.

- ``triton``: the fused Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
- ``cuda``: the compiled CUDA row pass of ``nlft_kernels._C`` (CUDA tensors, CUDA builds); the
  extension has no CUDA row-scaling or log-prob kernel, so those run in chunked torch.
- ``cpp``: the compiled C++ row pass, row scaling and log-prob forward of ``nlft_kernels._C``
  (CPU tensors); the log-prob backward runs in chunked torch.
- ``torch``: the chunked PyTorch path (any device).

``resolve_backend`` turns a requested name into one that can run on the tensors' device, or
raises with the reason (``unavailable``); nothing falls back silently. ``backend="auto"``
takes the C++ kernel on the CPU when ``_C`` loads (else ``torch``) and, on CUDA tensors, the
entry of ``GPU_CHOICE`` for the shape (else ``GPU_DEFAULT``). A compiled extension that is
missing, stale or built against another torch never breaks ``import nlft_kernels``:
``backends()`` says what happened and ``auto`` picks another backend.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from nlft_kernels.ops import extension_ops, kernels, torch_rows

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")

# The GPU kernel "auto" takes, by shape: entries (max rows N, max vocabulary V, backend), the
# first entry whose limits hold the shape wins; other shapes, and machines whose _C has no CUDA
# kernel, take GPU_DEFAULT. Fill it from `python -m benchmarks.bench_cpu_kernel --gpu` (CUDA
# against Triton per N and V). Triton stays the default until the CUDA kernel is measured faster.
GPU_CHOICE: tuple[tuple[int, int, str], ...] = ()
GPU_DEFAULT = "triton"

# Written by setup.py next to the package: whether the build made _C, why not, and the torch it
# was built against.
BUILD_INFO = "_build_info.json"
REBUILD = "pip install --force-reinstall --no-deps . after torch (or python setup.py build_ext --inplace in a checkout)"


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def extension() -> tuple[ModuleType | None, str]:
    """(``nlft_kernels._C`` or None, where it was loaded from or why it could not be).

    Tests run from a source checkout import the package from the checkout, which holds no
    compiled files after ``pip install .``; the extension that install built is then loaded
    from the installed distribution. Any failure to load (a missing file, a stale build, a
    torch ABI mismatch) is returned as a reason, never raised.
    """
    try:
        _C = importlib.import_module("nlft_kernels._C")
    except ModuleNotFoundError as err:
        if err.name != "nlft_kernels._C":
            return None, _load_failure(err, Path(__file__).parent)
        installed = _installed_file("_C.")
        if installed is None:
            return None, _not_built(err)
        return _load_installed(installed)
    except Exception as err:  # noqa: BLE001 - ImportError, OSError: undefined symbols, wrong ABI
        return None, _load_failure(err, Path(__file__).parent)
    return _C, f"loaded from {_C.__file__}"


def compiled() -> ModuleType:
    """``nlft_kernels._C`` for a kernel call of a backend that needs it; RuntimeError with the
    reason when it cannot load (``resolve_backend`` has normally said so before)."""
    module, why = extension()
    if module is None:
        raise RuntimeError(f"nlft_kernels._C is unavailable: {why}")
    return module


def _load_installed(path: str) -> tuple[ModuleType | None, str]:
    spec = importlib.util.spec_from_file_location(
        "nlft_kernels._C", path, loader=importlib.machinery.ExtensionFileLoader("nlft_kernels._C", path)
    )
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - see extension()
        return None, _load_failure(err, Path(path).parent)
    sys.modules["nlft_kernels._C"] = module
    return module, f"loaded from the installed package ({path})"


def build_info() -> dict | None:
    """What setup.py recorded about the build of ``_C`` (in place first, then the installed
    distribution), or None when no build wrote it."""
    for path in (Path(__file__).parent / BUILD_INFO, _installed_file(BUILD_INFO)):
        if path is not None and Path(path).is_file():
            try:
                return json.loads(Path(path).read_text())
            except (OSError, ValueError):
                return None
    return None


def _not_built(err: BaseException) -> str:
    info = build_info()
    if info and info.get("extension") != "built" and info.get("reason"):
        return f"nlft_kernels._C was not built at install: {info['reason']}"
    return f"nlft_kernels._C is not built ({err}); build it with {REBUILD}"


def _load_failure(err: BaseException, package_dir: Path) -> str:
    built_against = None
    info_path = package_dir / BUILD_INFO
    if info_path.is_file():
        try:
            built_against = json.loads(info_path.read_text()).get("torch")
        except (OSError, ValueError):
            built_against = None
    if built_against and built_against != torch.__version__:
        cause = f"it was built against torch {built_against}, this is torch {torch.__version__}"
    else:
        cause = "stale or built against another torch"
    return f"nlft_kernels._C does not load ({type(err).__name__}: {err}); {cause}: rebuild with {REBUILD}"


def _installed_file(prefix: str) -> str | None:
    """Path of ``nlft_kernels/<prefix>...`` in the installed distribution, if any (the compiled
    extension for ``"_C."``)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES) if prefix == "_C." else ("",)
    # Every distribution of that name on sys.path: in a checkout where `pip install .` ran, the
    # checkout's own nlft_kernels.egg-info (which lists no compiled file) comes first.
    for dist in importlib.metadata.distributions(name="nlft-kernels"):
        for file in dist.files or []:
            if file.parent.name == "nlft_kernels" and file.name.startswith(prefix) and file.name.endswith(suffixes):
                path = str(file.locate())
                if os.path.exists(path):
                    return path
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

    row_pass(views, cfg, compute_grad) -> (stats [3, N], saliency [N] bool, gradient or None);
    scale_rows(grad, factor, rows): grad[r] *= factor[r] in place;
    label_logprobs(x [B, T, V], labels [N], ignore_index) -> (log p(label) [N], lse [N]);
    label_logprobs_backward(x, labels, lse, g, ignore_index) -> gradient of x.
    """

    name: str
    row_pass: Callable
    scale_rows: Callable
    label_logprobs: Callable
    label_logprobs_backward: Callable


REGISTRY: dict[str, Backend] = {
    "triton": Backend(
        "triton", kernels.row_pass, kernels.scale_rows, kernels.label_logprobs, kernels.label_logprobs_backward
    ),
    "cuda": Backend(
        "cuda",
        extension_ops.row_pass,
        torch_rows.scale_rows,
        torch_rows.label_logprobs,
        torch_rows.label_logprobs_backward,
    ),
    "cpp": Backend(
        "cpp",
        extension_ops.row_pass,
        extension_ops.scale_rows,
        extension_ops.label_logprobs,
        torch_rows.label_logprobs_backward,
    ),
    "torch": Backend(
        "torch",
        torch_rows.row_pass,
        torch_rows.scale_rows,
        torch_rows.label_logprobs,
        torch_rows.label_logprobs_backward,
    ),
}


def implementation(backend: str) -> Backend:
    """The implementations of a resolved backend (``resolve_backend``'s result, not ``"auto"``)."""
    if backend not in REGISTRY:
        raise ValueError(f"backend must be one of {tuple(REGISTRY)} once resolved, got {backend!r}")
    return REGISTRY[backend]


def backends() -> dict[str, str]:
    """Each backend and whether it can run here, with the reason when it cannot."""
    cuda = torch.cuda.is_available()
    if cuda:
        triton_state = "available (CUDA)"
    elif triton_interpreted():
        triton_state = "available on CPU tensors through the Triton interpreter (slow)"
    else:
        triton_state = "unavailable: no CUDA device (set TRITON_INTERPRET=1 to interpret on the CPU)"
    module, where = extension()
    cpp_state = (
        f"available ({module.cpu_capability()} kernel; {where})" if module is not None else f"unavailable: {where}"
    )
    why_not_cuda = _cuda_unavailable()
    cuda_state = f"available ({where})" if why_not_cuda is None else f"unavailable: {why_not_cuda}"
    return {
        "triton": triton_state,
        "cuda": cuda_state,
        "cpp": cpp_state,
        "torch": "available (chunked PyTorch, any device)",
        "auto": f"CPU: {resolve_backend('auto', torch.device('cpu'))}; CUDA: {GPU_DEFAULT} (GPU_CHOICE by shape)",
    }
