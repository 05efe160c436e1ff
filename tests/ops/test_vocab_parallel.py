"""The vocabulary-parallel NLFT loss on 2 gloo CPU ranks (Megatron's layout: rank r holds the
columns [r * V / 2, (r + 1) * V / 2) of every view and the same rows of the LM head) equals one
process on the whole vocabulary: loss, details and every rank's slice of the gradients."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch

from nlft_kernels import NLFTConfig, linear_token_logprobs, nlft_linear_loss, nlft_loss
from tests import tolerances
from tests._inputs import generator, make_inputs, seed_of
from tests.training.test_trainer import _free_port

B, T, V, D, WORLD = 4, 11, 64, 16, 2
# The gradients against one process follow tests/tolerances.py's rule for the dtype (rtol, atol a
# fraction of the largest reference entry): both accumulate in float32 in another order (the
# saliency weight amplifies a float32 rounding of the logsumexp, 3.0e-5 relative seen in fp32); bf16
# gradients differ by a rounding of the stored bf16 value, and the linear form's hidden gradient is
# the sum of two bf16 partial products (one per vocabulary shard): up to two bf16 roundings.


def _grad_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = tolerances.TOLERANCES[dtype]
    atol = tol.grad_atol_fraction * max(float(want.abs().max()), 1e-6)
    torch.testing.assert_close(got, want, rtol=tol.grad_rtol, atol=atol)


# The relative tolerance of the loss and per-token values (log-probs, weights): the rule every
# other test uses (tests/tolerances.py's LOSS_RTOL): float32 sums of exponentials added in another
# order (per shard, then across shards) differ by a few float32 roundings of the row's logsumexp,
# which the saliency weight 1 + ((p_s - tau) / (1 - tau))**5 amplifies (3.0e-5 seen in fp32).
LOSS_RTOL = {torch.float32: tolerances.LOSS_RTOL, torch.bfloat16: tolerances.LOSS_RTOL}
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
    hidden = x.hidden.to(weight.dtype).detach().requires_grad_()
    standard = linear_token_logprobs(hidden.detach(), heads[0], labels, bias, vocab_parallel_group=group)
    judge = linear_token_logprobs(hidden.detach(), heads[1], labels, bias, vocab_parallel_group=group)
    loss, details = nlft_linear_loss(
        hidden, weight, labels, x.correct, standard=standard, judge=judge, bias=bias, return_details=True,
        config=NLFTConfig(correct_threshold=0.2, ratio_threshold=1.05, judge_min_prob=0.0),
        vocab_parallel_group=group,
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


def _same_details(got, want, rtol=1e-5, atol_fraction=0.0):
    for name in ("saliency", "unlikelihood", "cluster", "killed"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("logprob_base", "logprob_standard", "logprob_judge", "weight", "token_loss"):
        want_value = getattr(want, name)
        atol = max(1e-5, atol_fraction * float(want_value.abs().max()))
        torch.testing.assert_close(getattr(got, name), want_value, rtol=rtol, atol=atol, msg=name)


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
        torch.testing.assert_close(got["loss"], loss, rtol=LOSS_RTOL[dtype], atol=1e-5)
        _same_details(got["details"], details, LOSS_RTOL[dtype])
        _grad_close(got["grad"], _shard(x.base.grad, r), dtype)

    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    lin_loss, lin_details, standard, hidden_grad = _linear_outputs(x, w, b, heads, labels)
    assert bool(lin_details.saliency[x.correct].any()) and bool(lin_details.unlikelihood.any())
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["standard"], standard, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["lin_loss"], lin_loss, rtol=LOSS_RTOL[dtype], atol=1e-5)
        # The logits shard and the chunks are F.linear's in bfloat16: GEMMs of other shapes may
        # round a logit to the neighbouring bfloat16, which moves a token's terms by that much.
        _same_details(got["lin_details"], lin_details, LOSS_RTOL[dtype], 2**-8 if dtype == torch.bfloat16 else 0.0)
        _grad_close(got["hidden_grad"], hidden_grad, dtype)
        _grad_close(got["weight_grad"], _shard(w.grad, r), dtype)
        _grad_close(got["bias_grad"], _shard(b.grad, r), dtype)
