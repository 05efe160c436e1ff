"""The three users of the NLFT batch loss run the same code: on one batch, the plain step
(``nlft_step``), ``NLFTTrainer.compute_loss``, the sharded path on one rank (FSDP2 and FSDP1 on
gloo, the head reached inside its forward) give bit-identical losses and gradients, and the
saliency map's per-token details add up to the same loss."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch

from nlft_kernels import NLFTConfig
from nlft_kernels.saliency_map import batch_details
from nlft_kernels.training.arguments import NLFTTrainingArguments
from nlft_kernels.training.data import NLFTCollator, encode_records
from nlft_kernels.training.distributed import sharding_of
from nlft_kernels.training.heads import HeadInsideForward, PlainHead, head_access
from nlft_kernels.training.trainer import NLFTTrainer, nlft_step
from tests._tiny import tiny_model, tiny_records, tiny_tokenizer
from tests.training.test_distributed import _shard
from tests.training.test_trainer import _free_port

# Every rule fires on the tiny random model: saliency of both kinds and clusters.
CONFIG = NLFTConfig(correct_threshold=0.0025, ratio_threshold=1.0, judge_min_prob=1e-4, cluster_threshold=0.0)
# 0: the judge view a pure teacher (its own forward); 0.5: its rows ride in the base forward.
JUDGE_NLL_WEIGHTS = (0.0, 0.5)
ENGINES = ("fsdp2", "fsdp1")


def _batch(tok) -> dict[str, torch.Tensor]:
    batch = NLFTCollator(tok.pad_token_id)(encode_records(tiny_records(), tok))
    assert batch["correct"].any() and not batch["correct"].all()  # both kinds of sample: every view runs
    return batch


def _grads(model, engine: str | None) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, whole, by its name without the engine's wrapper prefixes."""
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if engine == "fsdp2" else p.grad
        grads[name.replace("_fsdp_wrapped_module.", "")] = grad.detach().clone()
    return grads


def _plain(judge_nll_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    assert isinstance(head_access(model), PlainHead)
    loss = nlft_step(model, _batch(tok), CONFIG, judge_nll_weight=judge_nll_weight, pad_token_id=tok.pad_token_id)
    loss.backward()
    return loss.detach(), _grads(model, None)


def _one_rank_worker(rank: int, port: int, out: str) -> None:
    """World size 1: the model plain and sharded by each engine, one step of every judge_nll_weight
    (all in this process: the same threads, so the same summation order)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        tok = tiny_tokenizer()
        results = {("plain", weight): _plain(weight) for weight in JUDGE_NLL_WEIGHTS}
        for engine in ENGINES:
            for weight in JUDGE_NLL_WEIGHTS:
                model = _shard(tiny_model(len(tok)), engine, 1)
                assert sharding_of(model) == engine and isinstance(head_access(model), HeadInsideForward)
                loss = nlft_step(model, _batch(tok), CONFIG, judge_nll_weight=weight, pad_token_id=tok.pad_token_id)
                loss.backward()
                results[engine, weight] = (loss.detach(), _grads(model, engine))
        torch.save(results, Path(out) / "sharded.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def plain():
    return {weight: _plain(weight) for weight in JUDGE_NLL_WEIGHTS}


def _assert_identical(a, b, what: str) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0, msg=what)
    assert grads_a.keys() == grads_b.keys() and "lm_head.weight" in grads_a, what
    assert any(bool(g.abs().sum() > 0) for g in grads_a.values()), what
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0, msg=f"{what}: {name}")


@pytest.mark.parametrize("judge_nll_weight", JUDGE_NLL_WEIGHTS)
def test_trainer_compute_loss_is_the_step(plain, judge_nll_weight, tmp_path):
    """NLFTTrainer's loss, its judge_nll_weight taken from NLFTTrainingArguments (as train() runs it)."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    args = NLFTTrainingArguments(
        output_dir=str(tmp_path), max_steps=1, judge_nll_weight=judge_nll_weight, use_cpu=True, disable_tqdm=True
    )
    trainer = NLFTTrainer(model=model, args=args, train_dataset=[], processing_class=tok, nlft_config=CONFIG)
    assert trainer.judge_nll_weight == judge_nll_weight
    loss = trainer.compute_loss(model, _batch(tok))
    loss.backward()
    _assert_identical(plain[judge_nll_weight], (loss.detach(), _grads(model, None)), "NLFTTrainer.compute_loss")


def test_sharded_on_one_rank_is_the_step(tmp_path):
    """FSDP2 and FSDP1 on one gloo rank: the head's work inside its forward, the same bits."""
    import torch.multiprocessing as mp

    mp.spawn(_one_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=1, join=True)
    results = torch.load(tmp_path / "sharded.pt")
    assert {engine for engine, _ in results} == {"plain", *ENGINES}
    for (engine, weight), result in results.items():
        _assert_identical(results["plain", weight], result, f"{engine}, judge_nll_weight={weight}")


def test_saliency_details_are_the_step(plain):
    """The map's token losses, averaged per sample as ``sample_mean`` does, are the step's loss."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    batch = _batch(tok)
    details, judged = batch_details(model, batch, CONFIG, tok.pad_token_id)
    assert torch.equal(judged, ~batch["correct"])
    for mark in ("saliency", "unlikelihood", "cluster"):  # CONFIG's rules fire on the batch
        assert bool(getattr(details, mark).any()), mark
    valid = batch["labels"] != CONFIG.ignore_index
    per_sample = (details.token_loss.double() * valid).sum(1) / valid.sum(1)
    torch.testing.assert_close(per_sample.mean(), plain[0.0][0].double(), rtol=1e-6, atol=0)
