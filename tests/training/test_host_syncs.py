"""Host syncs per nlft_step (counted on the CPU by tests/_host_syncs.py), pinned so that new ones
on the hot path show up. At batch 4 of the tiny Llama (4 sample groups), forward and backward,
before issue 14: 30 (the trainer's own: 3, a nonzero and two trims). Then 28: the trainer reads
the collated batch once (free while it is on the host); ``validate=False`` dropped the ops' 15
input checks (13 left). Now 11 with ``validate=False``: backward's test of ``grad_output == 1``
and the fix-up's rows are device-side (issue 21); what is left is the linear loss's chunk
schedule (sample groups, the rows it fixes: ``ops/linear_chunks.py``, through
``SecondStage.rows``) and the cluster walk's seeds (``ops/saliency_clusters.py``), which become
device-side in their own rework (tests/ops/test_host_syncs.py holds the losses at 0 without
them)."""

from __future__ import annotations

import torch

from nlft_kernels.training.data import NLFTCollator, encode_records
from nlft_kernels.training.trainer import nlft_step
from tests._host_syncs import HostSyncCounter
from tests._tiny import tiny_model, tiny_records, tiny_tokenizer


def _count(validate: bool) -> tuple[int, dict, float]:
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    batch = NLFTCollator(tok.pad_token_id)(encode_records(tiny_records(), tok))
    assert batch["correct"].any() and not batch["correct"].all()
    nlft_step(model, batch, pad_token_id=tok.pad_token_id)  # first call: one-time probes
    with HostSyncCounter() as counter:
        loss = nlft_step(model, batch, pad_token_id=tok.pad_token_id, validate=validate)
        loss.backward()
    return counter.count, counter.sites, float(loss)


def test_counter_sees_syncs():
    with HostSyncCounter() as counter:
        x = torch.arange(5.0)
        bool(x.any())
        x[x > 2].sum().item()
        x.nonzero()
    assert counter.count == 4  # bool, the boolean index, item, nonzero

    class Doubled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, grad):
            bool(grad.sum() > 0)
            return 2 * grad

    x = torch.ones(3, requires_grad=True)
    with HostSyncCounter() as counter:
        Doubled.apply(x).sum().backward()
    assert counter.count == 1  # seen in backward too


def test_host_syncs_per_step():
    checked, checked_sites, loss_checked = _count(validate=True)
    fast, sites, loss_fast = _count(validate=False)
    assert loss_checked == loss_fast
    print("validate=True", checked, dict(checked_sites), "\nvalidate=False", fast, dict(sites))
    trainer = sum(n for site, n in sites.items() if site.startswith("training/"))
    assert trainer == 1, sites  # _host_plan's one read of the batch
    assert checked <= 28, checked_sites
    assert fast <= 11, sites
    pending = ("ops/linear_chunks.py", "ops/saliency_clusters.py", "ops/stages.py")  # SecondStage.rows
    assert all(site.startswith(("training/", *pending)) for site in sites), sites
