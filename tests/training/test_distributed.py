"""nlft_step under FSDP2 (torch.distributed.fsdp.fully_shard) on 2 gloo CPU processes equals one
process on the union batch: one rank holds only a correct sample, the other only a wrong one,
so only one rank has a judge view to run (every rank runs it: FSDP forwards are collectives)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch

from nlft_kernels import NLFTConfig
from nlft_kernels.training.data import NLFTCollator, encode_records
from nlft_kernels.training.distributed import sharding_of
from nlft_kernels.training.trainer import add_lora, causal_lm, nlft_step
from tests._tiny import tiny_model, tiny_records, tiny_tokenizer
from tests.training.test_trainer import _free_port

# float32 throughout; FSDP2 reduce-scatters (averages) gradients: summation order differs.
RTOL, ATOL = 1e-5, 1e-6
LR = 0.5
# A low saliency threshold: saliency tokens of both kinds in a random model.
CONFIG = NLFTConfig(correct_threshold=0.002, ratio_threshold=1.01, judge_min_prob=0.0)


def _records():
    records = tiny_records()
    return [records[0], records[2]]  # rank 0: a correct sample; rank 1: a wrong one


def _model(tok, lora: bool):
    model = tiny_model(len(tok))
    if lora:
        model = add_lora(model, r=4, alpha=8, dropout=0.0)
        # LoRA's B starts at 0, which would leave A without gradient: start from a nonzero B.
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _step(model, tok, records, judge_nll_weight):
    batch = NLFTCollator(tok.pad_token_id)(encode_records(records, tok))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    loss = nlft_step(
        model, batch, CONFIG, judge_nll_weight=judge_nll_weight, optimizer=optimizer, pad_token_id=tok.pad_token_id
    )
    return float(loss)


def _full(param: torch.Tensor) -> torch.Tensor:
    return (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone()


def _fsdp2_worker(rank: int, world: int, port: int, out: str, lora: bool, judge_nll_weight: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        tok = tiny_tokenizer()
        model = _model(tok, lora)
        mesh = init_device_mesh("cpu", (world,))
        for layer in causal_lm(model).model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert sharding_of(model) == "fsdp2"
        calls = []
        hook = (
            causal_lm(model)
            .get_decoder()
            .register_forward_hook(
                lambda m, a, o: calls.append((o.last_hidden_state.shape[0], torch.is_grad_enabled()))
            )
        )
        loss = _step(model, tok, [_records()[rank]], judge_nll_weight)
        hook.remove()
        params = {n: _full(p) for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(params, Path(out) / "fsdp2.pt")
        torch.save({"calls": calls, "loss": loss}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "lora, judge_nll_weight",
    [(False, 0.0), (False, 0.5), (True, 0.0)],
    ids=["full", "full-judge_nll", "lora"],
)
def test_fsdp2_two_ranks_equal_one_process(tmp_path, lora, judge_nll_weight):
    import torch.multiprocessing as mp

    mp.spawn(_fsdp2_worker, args=(2, _free_port(), str(tmp_path), lora, judge_nll_weight), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "fsdp2.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # The same forwards on both ranks (the rank without a wrong sample runs a dummy judge row).
    assert [len(r["calls"]) for r in ranks] == ([2, 2] if judge_nll_weight else [3, 3])
    assert [[grad for _, grad in r["calls"]] for r in ranks][0] == [[grad for _, grad in r["calls"]] for r in ranks][1]

    tok = tiny_tokenizer()
    model = _model(tok, lora)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = _step(model, tok, _records(), judge_nll_weight)
    single = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, rtol=RTOL, atol=ATOL)
    assert sharded.keys() == single.keys()
    trained = [n for n in single if not torch.equal(single[n], start[n])]
    assert "lm_head.weight" in trained or lora
    assert trained and all("lora_" in n for n in trained) == lora
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=RTOL, atol=ATOL, msg=name)
