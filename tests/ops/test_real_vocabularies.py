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
from tests._inputs import seed_of
from tests.tolerances import assert_grad_close, assert_loss_close

# Llama-2 / Mistral, GPT-2 (odd: no 16-byte alignment of rows), Llama-3, Qwen2, Gemma.
VOCABS = (32000, 50257, 128256, 151936, 256000)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (standard, judge) as given to nlft_loss: [B, T, V] logits, [B, T] label log-probs, or no judge.
MODES = [(s, j) for s in ("logits", "logprobs") for j in ("logits", "logprobs", "absent")]
IGNORE = -100
pytestmark = pytest.mark.gpu_too
# The kernels run on CUDA tensors where a GPU is, else on CPU tensors under the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rows_with_every_branch(vocab: int, dtype: torch.dtype, seed: int, judged: bool):
    """Two samples of three rows: sample 0 correct (a saliency row p_s > 0.95, two ordinary);
    sample 1 wrong when ``judged`` (an unlikelihood row, an ordinary row the 6% rule zeroes, a
    padding row), else correct with a padding row."""
    g = torch.Generator().manual_seed(seed)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("standard_mode, judge_mode", MODES)
@pytest.mark.parametrize("vocab", VOCABS)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
def test_token_logprobs_at_real_vocabularies(vocab, dtype):
    g = torch.Generator().manual_seed(seed_of("token_logprobs real vocab", vocab, dtype))
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
