"""nlft_step under FSDP2 (torch.distributed.fsdp.fully_shard) and FSDP1 (FullyShardedDataParallel,
use_orig_params=True) on 2 gloo CPU processes equals one process on the union batch: one rank
holds only a correct sample, the other only a wrong one, so only one rank has a judge view to
run (every rank runs it: FSDP forwards are collectives)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch

from nlft_kernels import NLFTConfig
from nlft_kernels.training.data import NLFTCollator, encode_records
from nlft_kernels.training.distributed import sharding_of
from nlft_kernels.training.model_access import causal_lm
from nlft_kernels.training.trainer import add_lora, nlft_step
from tests._tiny import tiny_model, tiny_records, tiny_tokenizer
from tests.training.test_trainer import _assert_same_params, _ddp_worker, _free_port, _one_step

# float32 throughout; FSDP reduce-scatters (averages) gradients: summation order differs.
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
    if type(model).__name__ == "DeepSpeedEngine":  # ZeRO-3: the engine's backward and its SGD
        loss = nlft_step(model, batch, CONFIG, judge_nll_weight=judge_nll_weight, pad_token_id=tok.pad_token_id)
        model.backward(loss)
        model.step()
        return float(loss)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    loss = nlft_step(
        model, batch, CONFIG, judge_nll_weight=judge_nll_weight, optimizer=optimizer, pad_token_id=tok.pad_token_id
    )
    return float(loss)


def _shard(model, engine: str, world: int):
    """``model`` sharded over ``world`` ranks as a user would: per decoder layer, then the root."""
    layers = causal_lm(model).model.layers
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if engine == "zero3":
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # shard every parameter
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0; one process does not clip
        }
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = ModuleWrapPolicy({type(layers[0])})
    return FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))


def _full_parameters(model, engine: str) -> dict[str, torch.Tensor]:
    """Every parameter whole, by its name without the engine's wrapper prefixes."""
    if engine == "fsdp2":
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    if engine == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.module.parameters())):
            return {n: p.detach().clone() for n, p in model.module.named_parameters()}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model):
        return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in model.named_parameters()}


def _sharded_worker(
    rank: int, world: int, port: int, out: str, engine: str, lora: bool, judge_nll_weight: float
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")  # DeepSpeed's CPU accelerator: gloo
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        tok = tiny_tokenizer()
        model = _shard(_model(tok, lora), engine, world)
        assert sharding_of(model) == engine
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
        params = _full_parameters(model, engine)
        if rank == 0:
            torch.save(params, Path(out) / "sharded.pt")
        torch.save({"calls": calls, "loss": loss}, Path(out) / f"rank{rank}.pt")
        # No rank leaves while the other still has collectives or FSDP's gathers in flight: a gloo
        # peer that closes its connections mid-operation aborts the other process (SIGABRT, seen
        # in CI on fsdp1-full).
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "engine, lora, judge_nll_weight",
    [
        ("fsdp2", False, 0.0),
        ("fsdp2", False, 0.5),
        ("fsdp2", True, 0.0),
        ("fsdp1", False, 0.0),
        ("fsdp1", True, 0.0),
        ("zero3", False, 0.0),
        ("zero3", False, 0.5),
        ("zero3", True, 0.0),
    ],
    ids=[
        "fsdp2-full",
        "fsdp2-full-judge_nll",
        "fsdp2-lora",
        "fsdp1-full",
        "fsdp1-lora",
        "zero3-full",
        "zero3-full-judge_nll",
        "zero3-lora",
    ],
)
def test_sharded_two_ranks_equal_one_process(tmp_path, engine, lora, judge_nll_weight):
    import torch.multiprocessing as mp

    if engine == "zero3":
        pytest.importorskip(
            "deepspeed", reason="ZeRO-3 needs deepspeed (pip install deepspeed; DS_BUILD_OPS=0 on the CPU)"
        )

    args = (2, _free_port(), str(tmp_path), engine, lora, judge_nll_weight)
    mp.spawn(_sharded_worker, args=args, nprocs=2, join=True)
    sharded = torch.load(tmp_path / "sharded.pt")
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


def test_nlft_trainer_zero3_through_accelerate(tmp_path):
    """NLFTTrainer with a ZeRO-3 config (the HF Trainer hands it to accelerate's DeepSpeed plugin),
    2 gloo ranks of 1 record each on DeepSpeed's CPU accelerator, equals one process on both."""
    import torch.multiprocessing as mp

    pytest.importorskip("deepspeed", reason="ZeRO-3 needs deepspeed (pip install deepspeed; DS_BUILD_OPS=0 on the CPU)")
    zero3 = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",  # the Trainer's max_grad_norm=0: no clipping, as on one process
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # shard every parameter
    }
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), zero3), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    start = {n: p.detach().clone() for n, p in tiny_model(len(tiny_tokenizer())).named_parameters()}
    assert all(not torch.equal(ranks[0][n], start[n]) for n in ("lm_head.weight", "model.embed_tokens.weight"))
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    _assert_same_params(ranks[0], _one_step(tmp_path / "single", batch=2, accum=1))
