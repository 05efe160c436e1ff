"""``nlft_loss(..., inplace_grad=True)``: the gradient written into the base logits' own storage.

Exact against the float64 reference on every backend and dtype (the gradient written in
forward for float32/bfloat16, in backward for float16); the logits are the returned gradient's
storage; a tensor some other op saved the logits for raises instead of reading overwritten
values; and the peak memory of forward+backward grows by a few [N]-sized tensors, not by an
[N, V] buffer (measured from torch's allocator records, ``tests/_memory.py``).
"""

from __future__ import annotations

import pytest
import torch

from nlft_kernels import nlft_loss
from nlft_kernels.reference import nlft_loss_reference
from tests._inputs import make_inputs, seed_of
from tests._memory import peak_extra_bytes
from tests.conftest import backend_device, backend_params, dtype_params
from tests.tolerances import assert_grad_close, assert_loss_close

BACKENDS = backend_params(gpu_too=True)
pytestmark = pytest.mark.gpu_too


def _logits(x, dtype, device):
    """Logits as a model makes them: the output of an op (not a leaf), on ``device``."""
    leaf = x.base.detach().to(device=device, dtype=dtype).requires_grad_()
    return leaf, leaf * 1


@pytest.mark.parametrize("reduction", ["sample_mean", "none"])
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_gradient_equals_the_reference(backend, dtype, reduction):
    x = make_inputs(4, 9, 300, seed=seed_of("inplace", backend, dtype, reduction), hidden_dim=8)
    device = backend_device(backend)
    _, logits = _logits(x, dtype, device)
    kept = logits.detach().clone()
    views = dict(standard=x.standard.to(device), judge=x.judge.to(device), hidden_states=x.hidden.to(device))
    loss, details = nlft_loss(
        logits, x.labels.to(device), x.correct.to(device), **views, reduction=reduction, backend=backend,
        inplace_grad=True, return_details=True,
    )  # fmt: skip
    assert details.killed.any() and details.cluster.any(), "the per-sample fix-up must rescale rows"
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), device=device).view(loss.shape)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    assert grad.data_ptr() == logits.data_ptr(), "the gradient is the logits' storage"
    assert torch.equal(logits.detach(), grad), "the logits now hold their gradient"

    ref_base = kept.cpu().double().requires_grad_()
    ref = nlft_loss_reference(ref_base, x.labels, x.correct, x.standard, x.judge, reduction=reduction,
                              hidden_states=x.hidden)  # fmt: skip
    (ref_grad,) = torch.autograd.grad(ref, ref_base, grad_out.cpu().double())
    assert_loss_close(loss.cpu(), ref)
    assert_grad_close(grad.cpu(), ref_grad, dtype)


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
def test_a_saved_reference_to_the_logits_raises(dtype):
    """Another op that saved the logits for its backward finds them overwritten: autograd raises
    (the version counter moved) instead of using the gradient as logits."""
    x = make_inputs(2, 5, 40, seed=seed_of("inplace saved", dtype))
    _, logits = _logits(x, dtype, torch.device("cpu"))
    other = (logits**2).float().sum()  # pow saves its input, the logits themselves
    loss = nlft_loss(logits, x.labels, x.correct, standard=x.standard, judge=x.judge, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_inplace_needs_a_contiguous_non_leaf():
    x = make_inputs(2, 5, 40, seed=seed_of("inplace refused"))
    leaf, logits = _logits(x, torch.float32, torch.device("cpu"))
    kw = dict(standard=x.standard, judge=x.judge, inplace_grad=True)
    with pytest.raises(ValueError, match="not a leaf"):
        nlft_loss(leaf, x.labels, x.correct, **kw)
    wide = torch.cat([logits, logits], -1)[..., :40]
    with pytest.raises(ValueError, match="contiguous"):
        nlft_loss(wide, x.labels, x.correct, **kw)
    with torch.no_grad():  # no gradient: nothing is written, the logits stay
        before = logits.detach().clone()
        nlft_loss(logits, x.labels, x.correct, **kw)
        assert torch.equal(logits, before)


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16, torch.float16))
def test_inplace_adds_no_gradient_buffer_to_peak_memory(dtype):
    """Forward+backward of the compiled C++ kernel: without inplace_grad the peak grows by the
    [N, V] gradient buffer (checked, so that the measurement can fail), with it by at most 15%
    of one such buffer (the [N]-sized statistics)."""
    from tests.csrc import extension_or_skip

    extension_or_skip()
    x = make_inputs(4, 64, 4096, seed=seed_of("inplace memory", dtype))
    extra = {}
    for inplace in (False, True):
        _, logits = _logits(x, dtype, torch.device("cpu"))
        buffer = logits.numel() * logits.element_size()

        def step(logits=logits, inplace=inplace):
            loss = nlft_loss(logits, x.labels, x.correct, standard=x.standard, judge=x.judge, backend="cpp",
                             inplace_grad=inplace, validate=False)  # fmt: skip
            torch.autograd.grad(loss, logits)

        extra[inplace] = peak_extra_bytes(step) / buffer
    print(f"peak extra memory in [N, V] buffers of {dtype}: {extra}")
    assert extra[False] >= 0.95
    assert extra[True] <= 0.15
