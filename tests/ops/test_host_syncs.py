"""No host sync inside the losses with ``validate=False``: forward and backward of ``nlft_loss``
queue device work only (counted on the CPU by tests/_host_syncs.py: value reads and
data-dependent shapes), so nothing waits for the GPU and a CUDA graph can capture a step
(tests/ops/test_cuda_graphs.py). The data-dependent schedule lives on the device: every row's
fix-up factor (no ``nonzero`` of the rows to rescale), backward's pass skipping rows whose
total factor is 1 (no ``grad_output == 1`` test), a wrong sample without a judge made NaN (no
check)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nlft_kernels import NLFTConfig, linear_token_logprobs, nlft_linear_loss, nlft_loss
from nlft_kernels.ops.saliency_clusters import WALKS
from tests._host_syncs import HostSyncCounter
from tests._inputs import generator, make_inputs, seed_of
from tests.conftest import backend_params, dtype_params

BACKENDS = backend_params()


def _count(step) -> HostSyncCounter:
    step()  # first call: one-time probes (the extension's load, Triton's compile)
    with HostSyncCounter() as counter:
        step()
    return counter


def _step_never_syncs(loss_fn, *args, grad_out: float = 1.0, **kwargs):
    """Forward (``validate=False``) and backward of ``loss_fn(*args, **kwargs)``, counted after a
    first step: no host sync. Returns the details of one more step."""

    def step():
        loss, details = loss_fn(*args, validate=False, return_details=True, **kwargs)
        loss.backward(torch.full_like(loss, grad_out))
        return details

    counter = _count(step)
    assert counter.count == 0, dict(counter.sites)
    return step()


@pytest.mark.parametrize("grad_out", [1.0, 0.5])
@pytest.mark.parametrize("reduction", ["sample_mean", "none"])
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
@pytest.mark.parametrize("backend", BACKENDS)
def test_nlft_loss_forward_and_backward_never_sync(backend, dtype, reduction, grad_out):
    x = make_inputs(4, 10, 64, dtype=dtype, seed=seed_of("no sync", backend, dtype, reduction))
    base = x.base.detach().requires_grad_()
    details = _step_never_syncs(
        nlft_loss, base, x.labels, x.correct, standard=x.standard, judge=x.judge, reduction=reduction, backend=backend,
        grad_out=grad_out,
    )  # fmt: skip
    assert details.killed.any(), "the per-sample fix-up must rescale rows"


def test_the_counter_sees_the_checks_validate_makes():
    """validate=True reads values (label range, finiteness, ...): the counter sees them."""
    x = make_inputs(2, 5, 40, seed=seed_of("validate syncs"))
    counter = _count(lambda: nlft_loss(x.base, x.labels, x.correct, standard=x.standard, judge=x.judge))
    assert counter.count > 0


# The saliency-cluster walk syncs on the backends that take the batched walk (cpp, torch: the
# CPU, where a sync is free; ops/saliency_clusters.py); the cluster kernel (triton, cuda) does
# not, and the linear loss's chunk schedule comes from the [B, T] shape and each row's factor
# is applied on the device (ops/linear_chunks.py).
KERNEL_WALK = [b for b in BACKENDS if WALKS[b.values[0]] == "kernel"]


@pytest.mark.parametrize("backend", KERNEL_WALK)
def test_nlft_loss_with_clusters_never_syncs(backend):
    x = make_inputs(4, 10, 64, seed=seed_of("no sync clusters"), hidden_dim=8)
    base = x.base.detach().requires_grad_()
    details = _step_never_syncs(
        nlft_loss, base, x.labels, x.correct, standard=x.standard, judge=x.judge, hidden_states=x.hidden,
        backend=backend,
    )  # fmt: skip
    assert details.cluster.any(), "the walk must find cluster rows"


@pytest.mark.parametrize("clusters", [True, False], ids=["clusters", "no-clusters"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nlft_linear_loss_never_syncs(backend, clusters):
    if clusters and WALKS[backend] != "kernel":
        pytest.skip(f"{backend} takes the batched cluster walk, which sizes its batch on the host (the CPU)")
    x = make_inputs(4, 10, 64, seed=seed_of("no sync linear"), hidden_dim=16)
    g = generator(seed_of("no sync linear heads"))
    weight = torch.randn(64, 16, generator=g).requires_grad_()
    hidden = x.hidden.detach().requires_grad_()
    # teacher heads near the base head, labels the teachers prefer: saliency, clusters, the 6% rule
    heads = [3 * weight.detach() + torch.randn(64, 16, generator=g) for _ in range(2)]
    teacher = torch.where(x.correct[:, None, None], x.hidden @ heads[0].T, x.hidden @ heads[1].T)
    labels = torch.where(x.labels == -100, -100, teacher.argmax(-1))
    standard, judge = (linear_token_logprobs(hidden.detach(), head, labels) for head in heads)
    config = NLFTConfig(correct_threshold=0.2, ratio_threshold=1.05, judge_min_prob=0.0)
    if not clusters:
        config = replace(config, cluster_criterion="off")
    details = _step_never_syncs(
        nlft_linear_loss, hidden, weight, labels, x.correct, standard=standard, judge=judge, config=config,
        backend=backend,
    )  # fmt: skip
    assert details.killed.any(), "the per-sample fix-up must rescale rows"
    assert not clusters or details.cluster.any(), "the walk must find cluster rows"
