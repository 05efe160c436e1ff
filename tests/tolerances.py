"""Tolerances against the float64 reference, named once per input dtype.

Losses are accumulated in float32 whatever the input dtype, so they share one tolerance;
gradients are stored in the logits dtype, so theirs follows it (atol relative to the largest
reference entry). In 16-bit dtypes, Cut Cross-Entropy's rule applies as well
(``assert_no_worse_than_torch``): our error is no worse than torch's own computation in that
dtype, plus a margin.
"""

from dataclasses import dataclass

import torch

# float32 accumulation; the saliency weight 1 + ((p_s - tau) / (1 - tau))**5 amplifies its error ~100x.
LOSS_RTOL = 1e-4


@dataclass(frozen=True)
class Tolerance:
    name: str  # the test id of the dtype
    grad_rtol: float
    grad_atol_fraction: float  # of the largest reference entry


TOLERANCES = {
    torch.float32: Tolerance("fp32", 1e-4, 1e-5),
    torch.bfloat16: Tolerance("bf16", 1.6e-2, 8e-3),
    torch.float16: Tolerance("fp16", 2e-3, 1e-3),
    torch.float64: Tolerance("fp64", 1e-10, 1e-12),
}
GRAD_RTOL = {dtype: t.grad_rtol for dtype, t in TOLERANCES.items()}
GRAD_ATOL_FRACTION = {dtype: t.grad_atol_fraction for dtype, t in TOLERANCES.items()}
# nlft_linear_loss's gradients of hidden, weight and bias (rtol, atol fraction): the chunked
# matmuls in the input dtype add their rounding to the logits gradient's.
LINEAR_GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (3e-2, 1.5e-2), torch.float16: (4e-3, 2e-3)}
# CCE's margin over torch's own error, as a fraction of the largest reference entry: one
# rounding of the stored value in the dtype (2**-8 for bfloat16, 2**-11 for float16).
TORCH_MARGIN = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


def assert_loss_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    actual, expected = actual.detach(), expected.detach()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=LOSS_RTOL, atol=LOSS_RTOL * max(scale, 1e-3))


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    actual, expected = actual.detach(), expected.detach()
    assert actual.dtype == dtype, f"gradient dtype {actual.dtype}, expected {dtype}"
    atol = GRAD_ATOL_FRACTION[dtype] * max(float(expected.abs().max()), 1e-6)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=GRAD_RTOL[dtype], atol=atol)


def assert_no_worse_than_torch(
    actual: torch.Tensor, expected: torch.Tensor, torch_own: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """Cut Cross-Entropy's rule for 16-bit dtypes: the largest error of ``actual`` against the
    float64 ``expected`` is no larger than that of ``torch_own`` (torch's computation of the
    same quantity in ``dtype``) plus ``TORCH_MARGIN[dtype]`` of the largest reference entry."""
    expected = expected.detach().double()
    ours = float((actual.detach().double() - expected).abs().max())
    theirs = float((torch_own.detach().double() - expected).abs().max())
    margin = TORCH_MARGIN[dtype] * float(expected.abs().max())
    assert theirs > 0, f"{what}: torch's own {dtype} result is exact here; the comparison would prove nothing"
    assert ours <= theirs + margin, f"{what}: error {ours:.3g} against float64, torch's own in {dtype} {theirs:.3g}"
