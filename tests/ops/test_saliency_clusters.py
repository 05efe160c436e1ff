"""The vectorised saliency-cluster walk against the reference's Python loops."""

import pytest
import torch

from nlft_kernels import NLFTConfig, saliency_clusters
from nlft_kernels.reference import saliency_clusters_reference


def inputs(batch, steps, dim, seed):
    g = torch.Generator().manual_seed(seed)
    # Runs of similar states (a random walk) broken by unrelated ones, so walks both go on and stop.
    smooth = torch.randn(batch, steps, dim, generator=g).cumsum(1)
    hidden = smooth * (torch.rand(batch, steps, 1, generator=g) < 0.5) + 2 * torch.randn(batch, steps, dim, generator=g)
    saliency = torch.rand(batch, steps, generator=g) < 0.12
    valid = torch.ones(batch, steps, dtype=torch.bool)
    for b in range(batch):
        valid[b, steps - b % 4 :] = False
    return hidden, saliency & valid, valid


@pytest.mark.parametrize(
    "criterion, threshold", [("distance", 0.4), ("distance", 0.9), ("similarity", 0.3), ("similarity", 0.6)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(criterion, threshold, seed):
    hidden, saliency, valid = inputs(6, 40, 8, seed)
    config = NLFTConfig(cluster_criterion=criterion, cluster_threshold=threshold)
    cluster = saliency_clusters(hidden, saliency, valid, config=config)
    expected = saliency_clusters_reference(hidden, saliency, valid, config)
    assert torch.equal(cluster, expected)
    # The inputs exercise walks that accept neighbours and walks that stop before the sample ends.
    assert expected.any() and (valid & ~saliency & ~expected).any()
    assert not (cluster & ~valid).any() and not (cluster & saliency).any()


def test_flat_rows_with_sample_ids():
    hidden, saliency, valid = inputs(5, 30, 6, seed=3)
    config = NLFTConfig()
    expected = saliency_clusters_reference(hidden, saliency, valid, config)
    sample_ids = torch.arange(5)[:, None].expand(5, 30)[valid]
    cluster = saliency_clusters(hidden[valid], saliency[valid], sample_ids=sample_ids, config=config)
    assert expected.any()
    assert torch.equal(cluster, expected[valid])


def test_walks_never_cross_samples():
    # Two samples of orthogonal states: with the distance criterion every neighbour is accepted,
    # so the walk runs to the end of its own sample and must stop there.
    hidden = torch.eye(8).repeat(2, 1).view(2, 8, 8)
    saliency = torch.zeros(2, 8, dtype=torch.bool)
    saliency[0, 6] = True
    cluster = saliency_clusters(hidden, saliency)
    assert cluster[0].tolist() == [True] * 6 + [False, True] and not cluster[1].any()


def test_off_and_no_saliency():
    hidden, saliency, valid = inputs(2, 10, 4, seed=4)
    assert not saliency_clusters(hidden, saliency, valid, config=NLFTConfig(cluster_criterion="off")).any()
    assert not saliency_clusters(hidden, torch.zeros_like(saliency), valid).any()


def test_long_walks_are_compacted():
    # Longer than the compaction period, with walks that stop at different steps.
    hidden, saliency, valid = inputs(3, 90, 4, seed=5)
    config = NLFTConfig(cluster_criterion="similarity", cluster_threshold=-0.3)
    expected = saliency_clusters_reference(hidden, saliency, valid, config)
    assert torch.equal(saliency_clusters(hidden, saliency, valid, config=config), expected)
    covered = (expected | saliency).int()
    longest = max(len(run) for row in covered.tolist() for run in "".join(map(str, row)).split("0"))
    assert longest > 16 and (valid & ~saliency & ~expected).any()


def test_errors():
    hidden, saliency, valid = inputs(2, 10, 4, seed=6)
    with pytest.raises(ValueError, match="hidden_states"):
        saliency_clusters(hidden[:, :5], saliency, valid)
    with pytest.raises(ValueError, match="hidden_states"):
        saliency_clusters(hidden.long(), saliency, valid)
