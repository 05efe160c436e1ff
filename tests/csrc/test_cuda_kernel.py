"""The CUDA row pass of nlft_kernels._C against the float64 reference and the Triton kernel.

Runs only on a machine with a GPU and a _C built with its CUDA kernel; skipped with the reason
elsewhere (tests/csrc/test_cuda_compile.py still compiles the source there).
"""

import pytest
import torch

from nlft_kernels import nlft_loss
from nlft_kernels.backends import unavailable
from nlft_kernels.ops import launch
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


def on_chip_or_skip(monkeypatch, vocab: int, streams: int, dtype: torch.dtype, blocks: int) -> None:
    """Make ``launch.cuda_row_blocks`` choose the on-chip kernel with clusters of ``blocks`` for
    this shape, as a measured ``CUDA_TUNED`` entry would; skip without the CUDA backend or below
    sm_90."""
    if (why := unavailable("cuda", GPU)) is not None:
        pytest.skip(f"backend='cuda' {why}")
    device = launch.CudaDevice.of(GPU.index or 0)
    if device.capability < (9, 0):
        pytest.skip(f"the on-chip kernel needs thread-block clusters (sm_90); this GPU is {device.arch}")
    monkeypatch.setitem(launch.CUDA_TUNED, launch.cuda_tuned_key(device, vocab, streams, dtype), blocks)
    assert launch.cuda_row_blocks(vocab, streams, dtype, device, True) == blocks, "the launch must take it"


# (vocab, dtype, clusters): every cluster size at a small vocabulary (V=300 over 8 blocks: slices
# of 40 entries, the last one 20), slices that are empty (V=20 over 8 blocks: ranks 3-7 hold
# none; V=100: rank 7), and the real vocabularies at cluster sizes whose slices fit a block's
# shared memory.
ON_CHIP_CASES = [
    *((300, dtype, blocks) for dtype in (torch.float32, torch.bfloat16) for blocks in (1, 2, 4, 8)),
    (20, torch.float32, 8),
    (100, torch.bfloat16, 8),
    (4099, torch.float16, 4),
    (4099, torch.float64, 2),
    *((128256, torch.bfloat16, blocks) for blocks in (2, 4, 8)),
    (151936, torch.float32, 8),
]


@pytest.mark.parametrize(("vocab", "dtype", "blocks"), ON_CHIP_CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_on_chip_kernel_matches_reference_and_one_block_per_row(monkeypatch, vocab, dtype, blocks):
    """The on-chip kernel (a cluster of ``blocks`` per row, the base row kept in shared memory
    between the sweeps) through nlft_loss(backend="cuda"): equal to the float64 reference, and
    to the one-block kernel up to the order of the (max, sum) merges."""
    assert blocks in launch.on_chip_clusters(vocab, dtype), "a case the launch would refuse tests nothing"
    if vocab < 200:
        assert launch.on_chip_slice_bytes(vocab, dtype, blocks) // dtype.itemsize * (blocks - 1) >= vocab, (
            "the case must leave the last block's slice empty"
        )
    steps = 20 if vocab < 10000 else 4  # 4: rows of every kind at these seeds (assert_exercised)
    x = make_inputs(8, steps, vocab, dtype=dtype, seed=seed_of("cuda on chip", vocab, dtype, blocks))
    ref_base = x.base.detach().double().requires_grad_()
    ref, ref_details = nlft_loss_reference(
        ref_base, x.labels, x.correct, x.standard, x.judge, reduction="sample_mean", return_details=True
    )
    (ref_grad,) = torch.autograd.grad(ref, ref_base)
    assert_exercised(ref_details, x.correct)
    one_loss, one_grad, one_details = _run(x, "cuda", "sample_mean", torch.tensor(1.0))
    on_chip_or_skip(monkeypatch, vocab, 3, dtype, blocks)
    loss, grad, details = _run(x, "cuda", "sample_mean", torch.tensor(1.0))
    assert_loss_close(loss, ref)
    assert_grad_close(grad, ref_grad, dtype)
    cpu_details = type(details)(*(getattr(details, f).cpu() for f in details.__dataclass_fields__))
    assert_details(cpu_details, ref_details, x.labels, x.correct)
    assert_loss_close(loss, one_loss)
    assert_grad_close(grad, one_grad.double(), dtype)
    assert torch.equal(details.saliency, one_details.saliency)


@pytest.mark.parametrize("blocks", [2, 8])
def test_on_chip_kernel_writes_into_the_logits(monkeypatch, blocks):
    """inplace_grad=True with the on-chip kernel: every block reads its label entries before
    any block of the cluster overwrites the row with its gradient (the second cluster barrier)."""
    vocab, dtype = 128256, torch.bfloat16
    x = make_inputs(4, 3, vocab, dtype=dtype, seed=seed_of("cuda on chip inplace", blocks))
    on_chip_or_skip(monkeypatch, vocab, 3, dtype, blocks)
    logits = x.base.detach().to(device=GPU).requires_grad_() * 1
    kept = logits.detach().clone()
    loss = nlft_loss(
        logits, x.labels.to(GPU), x.correct.to(GPU), standard=x.standard.to(GPU), judge=x.judge.to(GPU),
        backend="cuda", inplace_grad=True,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.data_ptr() == logits.data_ptr(), "the gradient is the logits' storage"
    ref_base = kept.cpu().double().requires_grad_()
    ref = nlft_loss_reference(ref_base, x.labels, x.correct, x.standard, x.judge)
    (ref_grad,) = torch.autograd.grad(ref, ref_base)
    assert_loss_close(loss.cpu(), ref)
    assert_grad_close(grad.cpu(), ref_grad, dtype)


def test_on_chip_kernel_gives_nan_rows_for_out_of_range_labels(monkeypatch):
    """validate=False with a label outside [0, V) on correct and on wrong samples: the on-chip
    kernel makes those rows' gradients NaN, with the one-block kernel's NaN pattern in the loss
    and the gradient and its values everywhere else."""
    vocab, dtype = 4099, torch.bfloat16
    x = make_inputs(4, 6, vocab, dtype=dtype, seed=seed_of("cuda on chip out of range"))
    bad = [(b, 0) for b in range(4)]
    for b, t in bad:
        x.labels[b, t] = vocab + 3 if b % 2 else -7
    assert x.correct.any() and (~x.correct).any(), "rows of correct and wrong samples both"

    def run():
        base = x.base.detach().to(GPU).requires_grad_()
        loss = nlft_loss(
            base, x.labels.to(GPU), x.correct.to(GPU), standard=x.standard.to(GPU), judge=x.judge.to(GPU),
            backend="cuda", reduction="none", validate=False,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(loss.nansum(), base)
        return loss.float().cpu(), grad.float().cpu()

    one_loss, one_grad = run()
    on_chip_or_skip(monkeypatch, vocab, 3, dtype, 4)
    loss, grad = run()
    for b, t in bad:
        assert grad[b, t].isnan().all(), f"row ({b}, {t}) must be NaN"
    assert torch.equal(grad.isnan(), one_grad.isnan()) and torch.equal(loss.isnan(), one_loss.isnan())
    finite = ~grad.isnan()
    assert_grad_close(grad.where(finite, 0).double(), one_grad.where(finite, 0).double(), dtype)
