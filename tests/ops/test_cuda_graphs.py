"""On a GPU: a whole ``nlft_loss`` step (forward and backward, ``validate=False``) is captured in a
CUDA graph and replayed on new inputs with the eager result (it syncs with the host nowhere:
tests/ops/test_host_syncs.py), and every launch runs on its tensors' device, not on the current
one (the device guard of each launch)."""

from __future__ import annotations

import pytest
import torch

from nlft_kernels import nlft_loss, token_logprobs
from tests._inputs import make_inputs, seed_of
from tests.conftest import GPU, backend_params, dtype_params
from tests.tolerances import assert_grad_close, assert_loss_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and device guards need a GPU"),
]
# The backends that compute on CUDA tensors (each skipped with its reason where it cannot).
GPU_BACKENDS = [p for p in backend_params(gpu_too=True) if p.values[0] in ("triton", "cuda")]


def _on_gpu(x):
    return {name: getattr(x, name).detach().to(GPU) for name in ("base", "labels", "correct", "standard", "judge")}


def _step(t: dict, backend: str):
    loss = nlft_loss(t["base"], t["labels"], t["correct"], standard=t["standard"], judge=t["judge"],
                     backend=backend, validate=False)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, t["base"])
    return loss, grad


@pytest.mark.parametrize("dtype", dtype_params(torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_captured_step_replays_with_new_inputs(backend, dtype):
    _capture_and_replay(backend, dtype)


@pytest.mark.parametrize("dtype", dtype_params(torch.bfloat16, torch.float32))
def test_the_on_chip_cuda_kernel_is_captured_too(monkeypatch, dtype):
    """The CUDA row pass with its base row on chip (sm_90 clusters of 2): its launch (the shared
    memory opt-in, the cluster launch) is recorded in the graph and replays on new inputs."""
    from tests.csrc.test_cuda_kernel import on_chip_or_skip

    on_chip_or_skip(monkeypatch, 32000, 3, dtype, 2)
    _capture_and_replay("cuda", dtype)


def _capture_and_replay(backend: str, dtype: torch.dtype) -> None:
    first = make_inputs(4, 16, 32000, dtype=dtype, seed=seed_of("graph first", backend, dtype))
    second = make_inputs(4, 16, 32000, dtype=dtype, seed=seed_of("graph second", backend, dtype))
    static = _on_gpu(first)
    static["base"].requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles, the allocator fills) off the capture
        for _ in range(3):
            _step(static, backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = _step(static, backend)

    graph.replay()  # on the inputs it was captured with
    first_loss = loss.detach().clone()
    new = _on_gpu(second)
    with torch.no_grad():
        for name, value in new.items():
            static[name].copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    want_loss, want_grad = _step({**new, "base": new["base"].requires_grad_()}, backend)
    assert not torch.equal(first_loss, loss), "the replay must compute on the new inputs"
    assert_loss_close(loss, want_loss)
    assert_grad_close(grad, want_grad, dtype)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="a launch on another device than the current one needs 2 GPUs"
)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_launches_run_on_the_tensors_device(backend):
    x = make_inputs(4, 8, 5000, seed=seed_of("device guard", backend))
    other = torch.device("cuda", 1)
    with torch.cuda.device(0):
        base = x.base.detach().to(other).requires_grad_()
        loss = nlft_loss(base, x.labels.to(other), x.correct.to(other), standard=x.standard.to(other),
                         judge=x.judge.to(other), backend=backend)  # fmt: skip
        (grad,) = torch.autograd.grad(loss, base)
        lp = token_logprobs(base.detach(), x.labels.to(other), backend="triton")
    ref_base = x.base.detach().requires_grad_()
    ref = nlft_loss(ref_base, x.labels, x.correct, standard=x.standard, judge=x.judge, backend="torch")
    (ref_grad,) = torch.autograd.grad(ref, ref_base)
    assert grad.device == other
    assert_loss_close(loss.cpu(), ref)
    assert_grad_close(grad.cpu(), ref_grad, torch.float32)
    assert_loss_close(lp.cpu(), token_logprobs(x.base.detach(), x.labels, backend="torch"))
