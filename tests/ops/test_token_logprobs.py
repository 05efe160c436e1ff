"""token_logprobs on every path against the float64 reference."""

import pytest
import torch

from nlft_kernels import token_logprobs
from nlft_kernels.reference import token_logprobs_reference
from tests._inputs import generator
from tests.conftest import LOW_PRECISION, backend_params, dtype_params
from tests.tolerances import assert_grad_close, assert_loss_close, assert_no_worse_than_torch

# Every backend of the registry that computes on CPU tensors (skipped here with its reason).
BACKENDS = backend_params()


def inputs(shape, vocab, dtype, seed):
    g = generator(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[::5] = -100
    return logits, labels


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape, vocab",
    [
        pytest.param((3, 7), 333, id="partial tile"),
        pytest.param((11,), 64, id="below the tile"),
        pytest.param((2, 1), 1000, id="T=1"),
        pytest.param((2,), 50257, id="real vocabulary 50257"),
    ],
)
def test_matches_reference(shape, vocab, backend, dtype):
    # Partial single tiles (333, 1000), a vocabulary below the smallest tile (64) and a real,
    # unaligned one that spans many tiles with the package's own launch configuration (50257).
    logits, labels = inputs(shape, vocab, dtype, seed=vocab + len(shape))
    assert (labels == -100).any() and (labels != -100).any()
    lp = token_logprobs(logits, labels, backend=backend)
    ref_logits = logits.detach().double().requires_grad_()
    ref = token_logprobs_reference(ref_logits, labels)
    assert lp.shape == labels.shape and lp.dtype == torch.float32
    assert_loss_close(lp, ref)
    assert not lp[labels == -100].any()
    grad_out = torch.randn(shape, dtype=torch.float64, generator=generator(vocab))
    (grad,) = torch.autograd.grad(lp, logits, grad_out.float())
    (ref_grad,) = torch.autograd.grad(ref, ref_logits, grad_out)
    assert_grad_close(grad, ref_grad, dtype)
    if dtype in LOW_PRECISION:
        # CCE's rule: no worse than torch's own log_softmax and its backward in this dtype.
        own_logits = logits.detach().clone().requires_grad_()
        own = torch.log_softmax(own_logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        own = torch.where(labels != -100, own, 0)
        (own_grad,) = torch.autograd.grad(own, own_logits, grad_out.to(dtype))
        assert_no_worse_than_torch(lp, ref, own, dtype, "log-probs")
        assert_no_worse_than_torch(grad, ref_grad, own_grad, dtype, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_logits(backend):
    logits, labels = inputs((4, 9), 50, torch.float32, seed=1)
    sliced = logits[:, :-1]
    lp = token_logprobs(sliced, labels[:, :-1], backend=backend)
    assert_loss_close(lp, token_logprobs_reference(sliced.detach().double(), labels[:, :-1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    logits, labels = inputs((2, 3), 13, torch.float64, seed=2)
    fn = lambda x: token_logprobs(x, labels, backend=backend)
    assert torch.autograd.gradcheck(fn, (logits,), fast_mode=True)


def test_errors_name_the_argument():
    logits, labels = inputs((2, 3), 10, torch.float32, seed=3)
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(logits, labels[:, :2])
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(logits, torch.full_like(labels, 10))
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(logits.long(), labels)
    bad = logits.detach().clone()
    bad[0, 1, 4] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(bad, labels.clamp(min=0))
