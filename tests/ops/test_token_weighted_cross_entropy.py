"""token_weighted_cross_entropy and its fused linear form against the float64 reference
(``nlft_kernels.reference.token_weighted_cross_entropy_reference``): every backend, dtype and
named shape of the matrix, real vocabularies, weights of 0 and negative ones, padding, every
reduction with a grad_output other than 1, the gradient written into the logits
(``inplace_grad``), and ``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import pytest
import torch

from nlft_kernels import linear_token_weighted_cross_entropy, token_weighted_cross_entropy
from nlft_kernels.reference import CE_REDUCTIONS, token_weighted_cross_entropy_reference
from tests._inputs import generator, seed_of
from tests.conftest import (
    CPU,
    REAL_VOCABULARIES,
    SHAPES,
    backend_device,
    backend_params,
    dtype_params,
    shape_params,
)
from tests.ops.test_nlft_linear_loss import linear_logits
from tests.tolerances import LINEAR_GRAD_TOL, assert_grad_close, assert_loss_close

BACKENDS = backend_params(gpu_too=True)
DTYPES = dtype_params(torch.float32, torch.bfloat16, torch.float16)
pytestmark = pytest.mark.gpu_too


def _case(batch: int, steps: int, vocab: int, dtype, seed: int, device=CPU):
    """(logits, labels, weights): padding in every other sample's tail, weights of 0, negative
    ones and DFT-like probabilities in (0, 1)."""
    g = generator(seed)
    logits = (torch.randn(batch, steps, vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (batch, steps), generator=g)
    labels[::2, steps - max(1, steps // 3) :] = -100
    weights = torch.rand(batch, steps, generator=g)
    weights.view(-1)[::5] = 0.0
    weights.view(-1)[1::7] *= -2.0
    return logits.to(device), labels.to(device), weights.to(device)


def _check(backend, dtype, shape, reduction, inplace=False, seed_key=()):
    batch, steps, vocab = shape
    device = backend_device(backend)
    logits, labels, weights = _case(batch, steps, vocab, dtype, seed_of("twce", *seed_key, shape, dtype), device)
    assert (weights == 0).any() and (weights < 0).any() and (labels == -100).any(), "zero, negative weights, padding"
    kept = logits.detach().clone()
    leaf = logits.clone().requires_grad_()
    x = leaf * 1 if inplace else leaf
    loss = token_weighted_cross_entropy(x, labels, weights, reduction=reduction, backend=backend, inplace_grad=inplace)
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), device=device).view(loss.shape)
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    ref_x = kept.cpu().double().requires_grad_()
    ref = token_weighted_cross_entropy_reference(ref_x, labels.cpu(), weights.cpu(), reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref, ref_x, grad_out.cpu().double())
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_loss_close(loss.cpu(), ref)
    assert_grad_close(grad.cpu(), ref_grad, dtype)
    if inplace:
        assert grad.data_ptr() == x.data_ptr()
    return grad


@pytest.mark.parametrize("reduction", CE_REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, reduction):
    _check(backend, dtype, (4, 9, 300), reduction)


@pytest.mark.parametrize("shape", shape_params(*SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_named_shapes(backend, shape):
    _check(backend, torch.float32, shape, "mean")


@pytest.mark.parametrize("vocab", REAL_VOCABULARIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_vocabularies(backend, vocab):
    """A few rows at each real vocabulary: partial last tiles, rows without 16-byte alignment."""
    _check(backend, torch.bfloat16, (1, 3, vocab), "sum")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad(backend, dtype):
    _check(backend, dtype, (3, 6, 500), "mean", inplace=True)


def test_zero_weights_give_zero_rows_and_all_padding_zero_loss():
    logits, labels, weights = _case(2, 5, 40, torch.float32, seed_of("twce zeros"))
    x = logits.requires_grad_()
    loss = token_weighted_cross_entropy(x, labels, torch.zeros_like(weights))
    (grad,) = torch.autograd.grad(loss, x)
    assert float(loss) == 0.0 and not grad.any()
    all_pad = torch.full_like(labels, -100)
    loss = token_weighted_cross_entropy(x, all_pad, weights)
    (grad,) = torch.autograd.grad(loss, x)
    assert float(loss) == 0.0 and not grad.any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weights=torch.ones(2, 4)), "weights"),
        (dict(weights=torch.ones(2, 5, dtype=torch.long)), "weights"),
        (dict(reduction="token_mean"), "reduction"),
        (dict(labels=torch.full((2, 5), 40)), "labels"),
        (dict(weights=torch.full((2, 5), float("nan"))), "weights"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    logits, labels, weights = _case(2, 5, 40, torch.float32, seed_of("twce bad"))
    args = dict(labels=labels, weights=weights) | kwargs
    with pytest.raises(ValueError, match=match):
        token_weighted_cross_entropy(logits, args.pop("labels"), args.pop("weights"), **args)


def test_compiles_fullgraph():
    torch._dynamo.reset()
    logits, labels, weights = _case(2, 6, 50, torch.float32, seed_of("twce compile"))

    def fn(x):
        return (
            token_weighted_cross_entropy(x * 1, labels, weights, inplace_grad=True)
            + (token_weighted_cross_entropy(x, labels, weights, reduction="none") ** 2).sum()
        )

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        x = logits.clone().requires_grad_()
        out = f(x)
        out.backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("reduction", CE_REDUCTIONS)
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16))
@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] != "cuda"])
def test_linear_form_matches_reference(backend, dtype, reduction):
    """From hidden states in chunks of 8 rows (several chunks, a partial last one): loss and the
    gradients of hidden, weight and bias against float64 autograd on the reference, whose logits
    are ``F.linear``'s in the input dtype (the chunk driver's logits: ``linear_logits``)."""
    g = generator(seed_of("twce linear", backend, dtype, reduction))
    batch, steps, dim, vocab = 3, 7, 16, 300
    hidden = torch.randn(batch, steps, dim, generator=g).to(dtype)
    weight = (torch.randn(vocab, dim, generator=g) / dim**0.5 * 3).to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype)
    _, labels, weights = _case(batch, steps, vocab, dtype, seed_of("twce linear labels", dtype))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = linear_token_weighted_cross_entropy(
        leaves[0], leaves[1], labels, weights, leaves[2], reduction=reduction, chunk_size=8, backend=backend
    )
    grad_out = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)
    grads = torch.autograd.grad(loss, leaves, grad_out)
    ref_leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    logits = linear_logits(ref_leaves, dtype)
    ref = token_weighted_cross_entropy_reference(logits, labels, weights, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    assert_loss_close(loss, ref)
    rtol, atol_fraction = LINEAR_GRAD_TOL[dtype]
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol_fraction * float(want.abs().max()))
