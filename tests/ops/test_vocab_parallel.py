"""The vocabulary-parallel NLFT loss on 2 gloo CPU ranks (Megatron's layout: rank r holds the
columns [r * V / 2, (r + 1) * V / 2) of every view and the same rows of the LM head) equals one
process on the whole vocabulary: loss, details and every rank's slice of the gradients.

Tolerances are the package's rule (``tests/tolerances.py``): both sides accumulate in float32
but add the sums of exponentials in another order (per shard, then across shards), so they
differ by a few float32 roundings of each row's log-sum-exp, which the saliency weight
``1 + u**5`` amplifies (``LOSS_RTOL``); gradients are stored in the logits dtype
(``assert_grad_close``), and the linear form's hidden gradient is a sum of per-shard matmuls in
that dtype (``LINEAR_GRAD_TOL``)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nlft_kernels import NLFTConfig, linear_token_logprobs, nlft_linear_loss, nlft_loss
from tests._inputs import generator, make_inputs, seed_of
from tests.tolerances import LINEAR_GRAD_TOL, assert_grad_close, assert_loss_close
from tests.training.test_trainer import _free_port

B, T, V, D, WORLD = 4, 11, 64, 16, 2
CLUSTERS = NLFTConfig()  # clusters on: the hidden states are walked on every rank


def _head(seed, dtype):
    g = generator(seed)
    return (torch.randn(V, D, generator=g) / D**0.5 * 4).to(dtype), torch.randn(V, generator=g).to(dtype)


def _case(seed, dtype):
    """(inputs, the base head [V, D] and bias, the standard and judge heads, the linear loss's
    labels: those the standard head prefers on correct samples, the judge head on wrong ones)."""
    x = make_inputs(B, T, V, dtype=dtype, seed=seed, hidden_dim=D)
    weight, bias = _head(seed + 1, dtype)
    g = generator(seed + 2)
    heads = [(3 * weight.float() + torch.randn(V, D, generator=g)).to(dtype) for _ in range(2)]
    teacher = torch.where(x.correct[:, None, None], x.hidden @ heads[0].float().T, x.hidden @ heads[1].float().T)
    labels = torch.where(x.labels == -100, -100, (teacher + bias.float()).argmax(-1))
    return x, weight, bias, heads, labels


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    width = t.shape[-1] // WORLD if t.dim() > 1 and t.shape[-1] == V else t.shape[0] // WORLD
    if t.dim() > 1 and t.shape[-1] == V:
        return t[..., rank * width : (rank + 1) * width]
    return t[rank * width : (rank + 1) * width]  # head rows [V, D] or bias [V]


def _loss_outputs(x, base, reduction, group=None):
    loss, details = nlft_loss(
        base, x.labels, x.correct, standard=x.standard, judge=x.judge, hidden_states=x.hidden,
        reduction=reduction, return_details=True, vocab_parallel_group=group,
    )  # fmt: skip
    (loss * torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)).sum().backward()
    return loss.detach(), details


def _linear_outputs(x, weight, bias, heads, labels, group=None):
    """The linear form: with ``group``, ``nlft_linear_loss`` and ``linear_token_logprobs`` over the
    head's rows of this rank; without, one process's ``nlft_loss`` on the same logits, which the
    vocabulary-parallel form computes in the input dtype (``F.linear``), and the teachers'
    ``linear_token_logprobs``, from float32 logits with a group or without."""
    hidden = x.hidden.to(weight.dtype).detach().requires_grad_()
    config = NLFTConfig(correct_threshold=0.2, ratio_threshold=1.05, judge_min_prob=0.0)
    if group is None:
        standard = linear_token_logprobs(hidden.detach(), heads[0], labels, bias)
        judge = linear_token_logprobs(hidden.detach(), heads[1], labels, bias)
        loss, details = nlft_loss(
            F.linear(hidden, weight, bias), labels, x.correct, standard=standard, judge=judge, config=config,
            hidden_states=hidden, return_details=True,
        )  # fmt: skip
    else:
        standard = linear_token_logprobs(hidden.detach(), heads[0], labels, bias, vocab_parallel_group=group)
        judge = linear_token_logprobs(hidden.detach(), heads[1], labels, bias, vocab_parallel_group=group)
        loss, details = nlft_linear_loss(
            hidden, weight, labels, x.correct, standard=standard, judge=judge, bias=bias, return_details=True,
            config=config, vocab_parallel_group=group,
        )  # fmt: skip
    loss.backward()
    return loss.detach(), details, standard, hidden.grad


def _worker(rank: int, port: int, out: str, dtype_name: str, reduction: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        group = torch.distributed.new_group(list(range(WORLD)))
        dtype = getattr(torch, dtype_name)
        x, weight, bias, heads, labels = _case(seed_of("vocab_parallel", dtype_name, reduction), dtype)
        full_base = x.base
        x.standard, x.judge = _shard(x.standard, rank), _shard(x.judge, rank)
        base = _shard(full_base.detach(), rank).clone().requires_grad_()
        loss, details = _loss_outputs(x, base, reduction, group)
        w = _shard(weight, rank).clone().requires_grad_()
        b = _shard(bias, rank).clone().requires_grad_()
        heads = [_shard(h.detach(), rank) for h in heads]
        lin_loss, lin_details, standard, hidden_grad = _linear_outputs(x, w, b, heads, labels, group)
        torch.save(
            dict(loss=loss, details=details, grad=base.grad, lin_loss=lin_loss, lin_details=lin_details,
                 standard=standard, hidden_grad=hidden_grad, weight_grad=w.grad, bias_grad=b.grad),
            Path(out) / f"rank{rank}.pt",
        )  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


def _same_details(got, want):
    for name in ("saliency", "unlikelihood", "cluster", "killed"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("logprob_base", "logprob_standard", "logprob_judge", "weight", "token_loss"):
        assert_loss_close(getattr(got, name), getattr(want, name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["sample_mean", "none"])
def test_two_ranks_equal_one_process(tmp_path, dtype, reduction):
    import torch.multiprocessing as mp

    dtype_name = str(dtype).removeprefix("torch.")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), dtype_name, reduction), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    x, weight, bias, heads, labels = _case(seed_of("vocab_parallel", dtype_name, reduction), dtype)
    loss, details = _loss_outputs(x, x.base, reduction)
    # the inputs exercise both kinds of saliency, clusters, the 6% rule and padding
    assert bool(details.saliency[x.correct].any()) and bool(details.unlikelihood.any())
    assert bool(details.cluster.any()) and bool(details.killed.any()) and bool((x.labels == -100).any())
    for r, got in enumerate(ranks):
        assert_loss_close(got["loss"], loss)
        _same_details(got["details"], details)
        assert_grad_close(got["grad"], _shard(x.base.grad, r), dtype)

    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    lin_loss, lin_details, standard, hidden_grad = _linear_outputs(x, w, b, heads, labels)
    assert bool(lin_details.saliency[x.correct].any()) and bool(lin_details.unlikelihood.any())
    rtol, atol_fraction = LINEAR_GRAD_TOL[dtype]
    for r, got in enumerate(ranks):
        assert_loss_close(got["standard"], standard)
        assert_loss_close(got["lin_loss"], lin_loss)
        _same_details(got["lin_details"], lin_details)
        for name, want in (("hidden_grad", hidden_grad), ("weight_grad", _shard(w.grad, r)),
                           ("bias_grad", _shard(b.grad, r))):  # fmt: skip
            atol = atol_fraction * float(want.abs().max())
            torch.testing.assert_close(
                got[name].double(), want.double(), rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
            )
