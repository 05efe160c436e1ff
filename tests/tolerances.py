"""Tolerances against the float64 reference, named once per input dtype.

Losses are accumulated in float32 whatever the input dtype, so they share one tolerance;
gradients are stored in the logits dtype, so theirs follows it (atol relative to the largest
reference entry).
"""

import torch

# float32 accumulation; the saliency weight 1 + ((p_s - tau) / (1 - tau))**5 amplifies its error ~100x.
LOSS_RTOL = 1e-4
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float64: 1e-10}
GRAD_ATOL_FRACTION = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-12}


def assert_loss_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    actual, expected = actual.detach(), expected.detach()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=LOSS_RTOL, atol=LOSS_RTOL * max(scale, 1e-3))


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    actual, expected = actual.detach(), expected.detach()
    assert actual.dtype == dtype, f"gradient dtype {actual.dtype}, expected {dtype}"
    atol = GRAD_ATOL_FRACTION[dtype] * max(float(expected.abs().max()), 1e-6)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=GRAD_RTOL[dtype], atol=atol)
