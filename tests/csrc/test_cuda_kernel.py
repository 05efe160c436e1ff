"""The CUDA row pass of nlft_kernels._C against the float64 reference and the Triton kernel.

Runs only on a machine with a GPU and a _C built with its CUDA kernel; skipped with the reason
elsewhere (tests/csrc/test_cuda_compile.py still compiles the source there).
"""

import pytest
import torch

from nlft_kernels import nlft_loss
from nlft_kernels.backends import unavailable
from nlft_kernels.reference import REDUCTIONS, nlft_loss_reference
from tests._inputs import generator, make_inputs, seed_of
from tests.conftest import GPU, dtype_params
from tests.ops.test_nlft_loss import assert_details, assert_exercised
from tests.tolerances import assert_grad_close, assert_loss_close

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def cuda_kernel():
    why = unavailable("cuda", GPU)
    if why is not None:
        pytest.skip(f"backend='cuda' {why}")


def _run(x, backend: str, reduction: str, grad_out: torch.Tensor):
    base = x.base.detach().cuda().requires_grad_()
    loss, details = nlft_loss(
        base,
        x.labels.cuda(),
        x.correct.cuda(),
        standard=x.standard.cuda(),
        judge=x.judge.cuda(),
        reduction=reduction,
        backend=backend,
        return_details=True,
    )
    (grad,) = torch.autograd.grad(loss, base, grad_out.to(device="cuda", dtype=loss.dtype))
    return loss.cpu(), grad.cpu(), details


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16, torch.float16, torch.float64))
@pytest.mark.parametrize("vocab", [300, 4099])
def test_cuda_matches_reference_and_triton(dtype, reduction, vocab):
    x = make_inputs(8, 20, vocab, dtype=dtype, seed=seed_of("cuda", dtype, reduction, vocab))
    ref_base = x.base.detach().double().requires_grad_()
    ref, ref_details = nlft_loss_reference(
        ref_base, x.labels, x.correct, x.standard, x.judge, reduction=reduction, return_details=True
    )
    g = generator(seed_of("cuda grad_out", dtype, reduction, vocab))
    grad_out = torch.randn(ref.shape, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0)
    grad_out = grad_out.double()
    (ref_grad,) = torch.autograd.grad(ref, ref_base, grad_out)
    assert_exercised(ref_details, x.correct)
    loss, grad, details = _run(x, "cuda", reduction, grad_out)
    assert_loss_close(loss, ref)
    assert_grad_close(grad, ref_grad, dtype)
    cpu_details = type(details)(*(getattr(details, f).cpu() for f in details.__dataclass_fields__))
    assert_details(cpu_details, ref_details, x.labels, x.correct)
    if dtype != torch.float64:  # Triton's float64 path is not what is compared here
        t_loss, t_grad, t_details = _run(x, "triton", reduction, grad_out)
        assert_loss_close(loss, t_loss)
        assert_grad_close(grad, t_grad.double(), dtype)
        assert torch.equal(details.saliency, t_details.saliency)


def test_fp16_gradient_survives_loss_scaling():
    """float16 logits get float32 gradient rows (nlft::grad_dtype_for, as
    nlft_kernels.ops.launch.grad_dtype): GradScaler's factor arrives only in backward, and the
    entries that float16 rows would have flushed to 0 before it must survive (the CUDA copy of
    tests/ops/test_launch_hazards.py's test)."""
    x = make_inputs(2, 4, 4000, seed=seed_of("cuda fp16 underflow"))
    base = (x.base.detach() * 4).half()  # wide logits: tiny softmax entries
    scale = 2.0**12  # the largest entries stay below fp16's maximum
    cuda_base = base.cuda().requires_grad_()
    loss = nlft_loss(
        cuda_base,
        x.labels.cuda(),
        x.correct.cuda(),
        standard=x.standard.half().cuda(),
        judge=x.judge.half().cuda(),
        backend="cuda",
    )
    (saved,) = loss.grad_fn.saved_tensors
    assert saved.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss * scale, cuda_base)
    ref_base = base.double().requires_grad_()
    ref = nlft_loss_reference(ref_base, x.labels, x.correct, x.standard.half(), x.judge.half())
    (ref_grad,) = torch.autograd.grad(ref * scale, ref_base)
    tiny = (ref_grad.abs() / scale < 2.0**-25) & (ref_grad.abs() > 2.0**-22)
    assert tiny.sum() > 100, "the inputs must have gradient entries that underflow fp16 before scaling"
    grad = grad.cpu()
    assert grad.dtype == torch.float16
    assert (grad[tiny] != 0).all(), "entries underflowed to 0 before the loss scale applied"
    assert_grad_close(grad, ref_grad, torch.float16)
