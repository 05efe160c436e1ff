"""The public report of the backends: ``nlft_kernels.backends()`` says which implementation can
run here and, for each that cannot, why (from the registry, ``nlft_kernels.backends``, and the
extension loader, ``nlft_kernels.extension``)."""

from __future__ import annotations

import torch

from nlft_kernels import backends as registry


def backends() -> dict[str, str]:
    """Each backend and whether it can run here, with the reason when it cannot."""
    cuda = torch.cuda.is_available()
    if cuda:
        triton_state = "available (CUDA)"
    elif registry.triton_interpreted():
        triton_state = "available on CPU tensors through the Triton interpreter (slow)"
    else:
        triton_state = "unavailable: no CUDA device (set TRITON_INTERPRET=1 to interpret on the CPU)"
    module, where = registry.extension()
    cpp_state = (
        f"available ({module.cpu_capability()} kernel; {where})" if module is not None else f"unavailable: {where}"
    )
    why_not_cuda = registry._cuda_unavailable()
    cuda_state = f"available ({where})" if why_not_cuda is None else f"unavailable: {why_not_cuda}"
    cpu_auto = registry.resolve_backend("auto", torch.device("cpu"))
    return {
        "triton": triton_state,
        "cuda": cuda_state,
        "cpp": cpp_state,
        "torch": "available (chunked PyTorch, any device)",
        "auto": f"CPU: {cpu_auto}; CUDA: {registry.GPU_DEFAULT} (GPU_CHOICE by shape)",
    }
