"""Which implementation runs where, and why.

- ``triton``: the fused Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
- ``cuda``: the compiled CUDA row pass of ``nlft_kernels._C`` (CUDA tensors, CUDA builds).
- ``cpp``: the compiled C++ row pass of ``nlft_kernels._C`` (CPU tensors).
- ``torch``: the chunked PyTorch path (any device).
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def extension() -> tuple[ModuleType | None, str]:
    """(``nlft_kernels._C`` or None, where it was loaded from or why it could not be).

    Tests run from a source checkout import the package from the checkout, which holds no
    compiled files after ``pip install .``; the extension that install built is then loaded
    from the installed distribution.
    """
    try:
        from nlft_kernels import _C
    except ModuleNotFoundError as err:
        installed = _installed_extension()
        if installed is None:
            return None, f"nlft_kernels._C is not built ({err}); reinstall with a C++ compiler (see setup.py)"
        spec = importlib.util.spec_from_file_location(
            "nlft_kernels._C", installed, loader=importlib.machinery.ExtensionFileLoader("nlft_kernels._C", installed)
        )
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError as load_err:
            return None, f"the installed nlft_kernels._C at {installed} does not load ({load_err})"
        sys.modules["nlft_kernels._C"] = module
        return module, f"loaded from the installed package ({installed})"
    except ImportError as err:
        return None, f"nlft_kernels._C does not load ({err}); rebuild it against the installed torch"
    return _C, f"built in place ({_C.__file__})"


def _installed_extension() -> str | None:
    """Path of the ``nlft_kernels/_C`` shared object of the installed distribution, if any."""
    try:
        files = importlib.metadata.distribution("nlft-kernels").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for file in files:
        if file.parent.name == "nlft_kernels" and file.name.startswith("_C.") and file.name.endswith(suffixes):
            path = str(file.locate())
            return path if os.path.exists(path) else None
    return None


def _cpp_unavailable() -> str | None:
    module, why = extension()
    return None if module is not None else why


def _cuda_unavailable() -> str | None:
    module, why = extension()
    if module is None:
        return why
    if not module.built_with_cuda():
        return "nlft_kernels._C was built without CUDA (CPU torch, no nvcc, or NLFT_SKIP_CUDA_BUILD=1)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The implementation that computes on ``device``: ``"triton"``, ``"cuda"``, ``"cpp"`` or ``"torch"``.

    ``auto``: Triton for CUDA tensors (the CUDA kernel has not been measured against it on a
    GPU yet, so Triton stays the default there); on the CPU the C++ kernel when
    ``nlft_kernels._C`` is built, else the chunked torch path. ``triton`` on CPU tensors needs
    ``TRITON_INTERPRET=1`` (set before triton is imported).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        return "cpp" if device.type == "cpu" and _cpp_unavailable() is None else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device.type}); on the CPU set TRITON_INTERPRET=1 "
            "before importing triton, or use backend='torch'"
        )
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got {device.type}")
        if (why := _cpp_unavailable()) is not None:
            raise ValueError(f"backend='cpp' is unavailable: {why}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {device.type}")
        if (why := _cuda_unavailable()) is not None:
            raise ValueError(f"backend='cuda' is unavailable: {why}")
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
    }
