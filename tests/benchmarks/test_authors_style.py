"""The authors'-style baseline computes the spec's loss: same value and base gradient as the oracle."""

import pytest
import torch

from benchmarks.authors_style import authors_style_loss
from nlft_kernels.reference import nlft_loss_reference
from tests._inputs import make_inputs
from tests.tolerances import assert_grad_close, assert_loss_close


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_hidden", [False, True], ids=["no_clusters", "clusters"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(dtype, with_hidden, seed):
    inp = make_inputs(batch=8, steps=24, vocab=97, dtype=dtype, seed=seed)
    hidden = inp.hidden if with_hidden else None
    expected, details = nlft_loss_reference(
        inp.base,
        inp.labels,
        inp.correct,
        inp.standard,
        inp.judge,
        reduction="sample_mean",
        hidden_states=hidden,
        return_details=True,
    )
    # The inputs reach every branch of the rule that this case can reach.
    assert details["saliency"].any() and details["unlikelihood"].any() and details["killed"].any()
    assert details["cluster"].any() == with_hidden
    (expected_grad,) = torch.autograd.grad(expected, inp.base)

    # One [3, B, T, V] batch with gradient, as the three prompt views run in the authors' code.
    views = torch.stack([inp.base.detach(), inp.standard, inp.judge]).requires_grad_()
    loss = authors_style_loss(views, inp.labels, inp.correct, hidden_states=hidden)
    loss.backward()

    assert_loss_close(loss, expected)
    assert_grad_close(views.grad[0], expected_grad, dtype)
    # The teachers carry gradient but the weights are detached, so it is zero.
    assert views.grad[1:].abs().max() == 0
