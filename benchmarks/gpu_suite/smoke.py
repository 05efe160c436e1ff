"""What a CPU can check of the carried wheels (``--prepare --check``): each imports the way the
benchmarks import it, and where a package has a path without CUDA it computes the right thing.

Liger's and Cut Cross-Entropy's Triton kernels need CUDA (Triton's interpreter stops in their
loops here: a strided ``range`` over a runtime length); Cut Cross-Entropy's torch.compile path
and bitsandbytes' int8 linear layer run on the CPU.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def main() -> int:
    from cut_cross_entropy import linear_cross_entropy
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss

    print(f"liger-kernel imports ({LigerCrossEntropyLoss.__name__}, {LigerFusedLinearCrossEntropyLoss.__name__})")
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(8, 32, generator=g), torch.randn(300, 32, generator=g)
    labels = torch.randint(0, 300, (8,), generator=g)
    got = linear_cross_entropy(hidden, weight, labels, impl="torch_compile")
    want = F.cross_entropy(hidden.double() @ weight.double().T, labels)
    assert abs(got.item() - want.item()) < 1e-4 * abs(want.item()), (got, want)
    print(f"cut-cross-entropy torch_compile: {got.item():.6f} (float64 cross-entropy {want.item():.6f})")

    from benchmarks.bench_train_step import int8_base_weights

    layer = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 300))
    layer.get_output_embeddings = lambda: layer[1]  # the second one plays the LM head, kept as it is
    x = torch.randn(16, 64, generator=g)
    want = layer(x)
    int8_base_weights(layer)
    assert type(layer[0]).__name__ == "Linear8bitLt" and layer[0].weight.dtype == torch.int8, layer[0]
    error = ((layer(x) - want).norm() / want.norm()).item()
    assert error < 2e-2, error
    print(f"bitsandbytes Linear8bitLt on the CPU: relative error {error:.1e} against the float32 layers")

    import pytest_timeout
    import xdist

    print(f"pytest-xdist {xdist.__version__}, pytest-timeout at {pytest_timeout.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
