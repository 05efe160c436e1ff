"""The Triton kernels as they really launch: real vocabularies, every view mode, 16- and 32-bit.

Nothing is patched: ``nlft_loss`` picks its launch configuration (``ops/launch.py``) as it does
on a GPU, so the tiles, warps and loop counts here are the ones a GPU compiles (under the
interpreter on the CPU, on the GPU where there is one). Few rows keep it fast; the rows are
built so that both saliency branches fire, the 6% rule rescales a row and padding is skipped.
"""

import pytest
import torch

from nlft_kernels import nlft_loss, token_logprobs
from nlft_kernels.ops.launch import launch_config
from nlft_kernels.reference import nlft_loss_reference, token_logprobs_reference
from tests._inputs import generator, seed_of
from tests.conftest import BEYOND_INT32, DEVICE, NEEDS_TRITON, REAL_VOCABULARIES, dtype_params
from tests.tolerances import assert_grad_close, assert_loss_close

DTYPES = dtype_params(torch.bfloat16, torch.float16, torch.float32)
# (standard, judge) as given to nlft_loss: [B, T, V] logits, [B, T] label log-probs, or no judge.
MODES = [(s, j) for s in ("logits", "logprobs") for j in ("logits", "logprobs", "absent")]
IGNORE = -100
# The kernels run on CUDA tensors where a GPU is (conftest.DEVICE), else on CPU tensors under the interpreter.
pytestmark = [pytest.mark.gpu_too, NEEDS_TRITON]


def rows_with_every_branch(vocab: int, dtype: torch.dtype, seed: int, judged: bool):
    """Two samples of three rows: sample 0 correct (a saliency row p_s > 0.95, two ordinary);
    sample 1 wrong when ``judged`` (an unlikelihood row, an ordinary row the 6% rule zeroes, a
    padding row), else correct with a padding row."""
    g = generator(seed)
    base = torch.randn(2, 3, vocab, generator=g, dtype=torch.float64) * 2
    standard = base + torch.randn(2, 3, vocab, generator=g, dtype=torch.float64)
    judge = base + torch.randn(2, 3, vocab, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, vocab, (2, 3), generator=g)
    labels[1, 2] = IGNORE
    # Lift the label of the standard view far above the row: p_s ~ 1 on row (0, 0).
    standard[0, 0, labels[0, 0]] = standard[0, 0].max() + 12
    # The judge view puts its mass on the label of row (1, 0): r1, r2 >> 1.5 and p_j > 0.01.
    judge[1, 0, labels[1, 0]] = judge[1, 0].max() + 12
    correct = torch.tensor([True, not judged])
    return base.to(dtype), standard.to(dtype), judge.to(dtype), labels, correct


def as_view(view: torch.Tensor, labels: torch.Tensor, mode: str):
    if mode == "absent":
        return None
    if mode == "logits":
        return view
    lp = torch.log_softmax(view.double(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels != IGNORE, lp, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("standard_mode, judge_mode", MODES)
@pytest.mark.parametrize("vocab", REAL_VOCABULARIES)
def test_nlft_loss_at_real_vocabularies(vocab, standard_mode, judge_mode, dtype):
    judged = judge_mode != "absent"
    base, standard, judge, labels, correct = rows_with_every_branch(
        vocab, dtype, seed_of("real vocab", vocab, standard_mode, judge_mode, dtype), judged
    )
    std_view, judge_view = as_view(standard, labels, standard_mode), as_view(judge, labels, judge_mode)
    streams = 1 + (standard_mode == "logits") + (judge_mode == "logits")
    launch = launch_config("row_pass", vocab, streams, dtype)
    assert vocab > launch.block_v, "the rows must span several tiles"

    logits = base.to(DEVICE).requires_grad_()
    on_device = {k: None if v is None else v.to(DEVICE) for k, v in (("standard", std_view), ("judge", judge_view))}
    loss, details = nlft_loss(
        logits, labels.to(DEVICE), correct.to(DEVICE), **on_device, backend="triton", return_details=True
    )
    ref_logits = base.double().requires_grad_()
    ref, ref_details = nlft_loss_reference(
        ref_logits, labels, correct, std_view, judge_view if judged else None, return_details=True
    )
    (grad,) = torch.autograd.grad(loss, logits)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    loss, grad = loss.cpu(), grad.cpu()

    # What the inputs exercise: both saliency branches, the 6% rule, padding.
    assert ref_details["saliency"][0, 0] and not ref_details["unlikelihood"][0].any()
    if judged:
        assert ref_details["unlikelihood"][1, 0] and ref_details["killed"][1, 1]
    assert labels[1, 2] == IGNORE
    assert_loss_close(loss, ref)
    assert_grad_close(grad, ref_grad, dtype)
    for name in ("saliency", "unlikelihood", "killed"):
        assert torch.equal(getattr(details, name).cpu(), ref_details[name]), name
    assert not grad[1, 2].any(), "a padding row got a gradient"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", REAL_VOCABULARIES)
def test_token_logprobs_at_real_vocabularies(vocab, dtype):
    g = generator(seed_of("token_logprobs real vocab", vocab, dtype))
    logits = (torch.randn(3, vocab, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (3,), generator=g)
    labels[1] = IGNORE
    on_device = logits.detach().to(DEVICE).requires_grad_()
    lp = token_logprobs(on_device, labels.to(DEVICE), backend="triton")
    ref_logits = logits.detach().double().requires_grad_()
    ref = token_logprobs_reference(ref_logits, labels)
    grad_out = torch.randn(3, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(lp, on_device, grad_out.float().to(DEVICE))
    (ref_grad,) = torch.autograd.grad(ref, ref_logits, grad_out)
    assert_loss_close(lp.cpu(), ref)
    assert_grad_close(grad.cpu(), ref_grad, dtype)


@pytest.mark.parametrize("rows_vocab", [BEYOND_INT32])
def test_token_logprobs_beyond_int32_offsets(rows_vocab):
    """N * V > 2**31 bfloat16 logits: the last rows, which start past int32 offsets, get the
    float64 reference's log-probs and gradient, as the first row does."""
    rows, vocab = rows_vocab
    checked = torch.tensor([0, rows - 2, rows - 1])
    assert (rows - 2) * vocab > 2**31, "the last rows must start past int32 offsets"
    g = generator(seed_of("beyond int32", rows, vocab))
    logits = torch.empty(rows, vocab, dtype=torch.bfloat16, device=DEVICE)
    logits.normal_(0, 3, generator=torch.Generator(DEVICE).manual_seed(seed_of("beyond int32 logits", vocab)))
    logits.requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=g)
    grad_out = torch.zeros(rows, dtype=torch.float64)
    grad_out[checked] = torch.randn(3, generator=g, dtype=torch.float64)
    lp = token_logprobs(logits, labels.to(DEVICE), backend="triton")
    (grad,) = torch.autograd.grad(lp, logits, grad_out.float().to(DEVICE))
    idx = checked.to(DEVICE)
    ref_logits = logits.detach()[idx].cpu().double().requires_grad_()
    ref = token_logprobs_reference(ref_logits, labels[checked])
    (ref_grad,) = torch.autograd.grad(ref, ref_logits, grad_out[checked])
    assert_loss_close(lp[idx].cpu(), ref)
    assert_grad_close(grad[idx].cpu(), ref_grad, torch.bfloat16)
    assert not grad[1].any(), "a row with no upstream gradient got one"
