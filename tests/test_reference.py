"""The oracle itself, on hand-worked one-token samples whose probabilities are set exactly."""

import math

import torch

from nlft_kernels import NLFTConfig
from nlft_kernels.reference import nlft_loss_reference, saliency_clusters_reference


def logits_for(p_label: float, vocab: int = 4) -> torch.Tensor:
    """[V] float64 logits whose softmax gives the label (index 0) probability ``p_label``."""
    rest = (1 - p_label) / (vocab - 1)
    return torch.tensor([math.log(p_label)] + [math.log(rest)] * (vocab - 1), dtype=torch.float64)


def one_token(p_b: float, p_s: float, p_j: float, correct: bool):
    base = logits_for(p_b).view(1, 1, -1)
    view = lambda p: logits_for(p).view(1, 1, -1)
    labels = torch.zeros(1, 1, dtype=torch.long)
    return nlft_loss_reference(base, labels, torch.tensor([correct]), view(p_s), view(p_j), return_details=True)


def test_correct_saliency_token():
    loss, d = one_token(p_b=0.5, p_s=0.975, p_j=0.3, correct=True)
    w = 1 + 0.5**5  # (0.975 - 0.95) / 0.05 = 0.5
    assert d["saliency"].item() and math.isclose(d["weight"].item(), w)
    assert math.isclose(loss.item(), 10 * (w + 1) * math.log(2))


def test_correct_ordinary_token():
    loss, d = one_token(p_b=0.25, p_s=0.57, p_j=0.3, correct=True)
    w = (0.57 / 0.95) ** 0.6
    assert not d["saliency"].item() and math.isclose(d["weight"].item(), w)
    assert math.isclose(loss.item(), 10 * (w + 1) * math.log(4))


def test_wrong_unlikelihood_token():
    # r1 = 0.6 / 0.2 = 3 > 1.5, r2 = 0.6 / 0.1 = 6 > 1.5, p_j > 0.01: unlikelihood, weight 2 sigmoid(3 - 1.5).
    loss, d = one_token(p_b=0.2, p_s=0.1, p_j=0.6, correct=False)
    w = 2 / (1 + math.exp(-1.5))
    assert d["unlikelihood"].item() and math.isclose(d["weight"].item(), w)
    assert math.isclose(loss.item(), 10 * w * -math.log(0.8))


def test_wrong_ordinary_token_and_no_nll():
    # r2 = 0.3 / 0.25 = 1.2 < 1.5: not saliency, weight sqrt(p_s), no NLL term for wrong samples.
    loss, d = one_token(p_b=0.1, p_s=0.25, p_j=0.3, correct=False)
    assert not d["saliency"].item() and math.isclose(d["weight"].item(), 0.5)
    assert math.isclose(loss.item(), 10 * 0.5 * math.log(10))


def test_saliency_fraction_kills_ordinary_tokens():
    # A wrong sample of 2 tokens, one saliency (50% > 6%): the other token's weight is 0.
    base = torch.stack([logits_for(0.2), logits_for(0.1)]).unsqueeze(0)
    standard = torch.stack([logits_for(0.1), logits_for(0.25)]).unsqueeze(0)
    judge = torch.stack([logits_for(0.6), logits_for(0.3)]).unsqueeze(0)
    labels = torch.zeros(1, 2, dtype=torch.long)
    loss, d = nlft_loss_reference(base, labels, torch.tensor([False]), standard, judge, return_details=True)
    assert d["saliency"].tolist() == [[True, False]] and d["killed"].tolist() == [[False, True]]
    w = 2 / (1 + math.exp(-1.5))
    assert math.isclose(loss.item(), 10 * w * -math.log(0.8) / 2)


def test_cluster_walk_by_hand():
    # Token 1 is salient. Leftwards: token 0 is orthogonal to it (distance 1 > 0.4): joins, and
    # the centre becomes (0.5, 0.5). Rightwards, from that carried centre: token 2 (1, 0) is at
    # distance 1 - 0.707 = 0.293: the walk stops, so token 3 never joins. With the similarity
    # criterion token 0 (similarity 0) stops the left walk, token 2 (similarity 1 to the centre
    # (1, 0)) joins, the centre stays (1, 0), and token 3 (similarity 0) stops the right walk.
    hidden = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    saliency = torch.tensor([[False, True, False, False]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    cluster = saliency_clusters_reference(hidden, saliency, valid, NLFTConfig())
    assert cluster.tolist() == [[True, False, False, False]]
    similar = saliency_clusters_reference(hidden, saliency, valid, NLFTConfig(cluster_criterion="similarity"))
    assert similar.tolist() == [[False, False, True, False]]


def test_cluster_centre_is_carried_into_the_right_walk():
    # The authors' token_cluster, one centre for both walks (distance criterion, 0.4), D = 2.
    # Token 1 (1, 0) is salient.
    #   left:  token 0 (0, 1): distance 1, joins; centre (0.5, 0.5); the response's edge, stops.
    #   right: token 2 (1, -1): similarity 0 to the carried (0.5, 0.5), distance 1, joins;
    #          centre (0.75, -0.25).
    #          token 3 (0, 1): similarity -0.25 / 0.791 = -0.316, distance 1.316, joins;
    #          centre (0.375, 0.375).
    #          token 4 (1, 1): similarity 1, distance 0, stops: token 5 (-1, 0) is never reached.
    # A centre restarted at (1, 0) for the right walk would stop at token 2 (distance 0.293).
    hidden = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, -1.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    saliency = torch.tensor([[False, True, False, False, False, False]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    cluster = saliency_clusters_reference(hidden, saliency, valid, NLFTConfig())
    assert cluster.tolist() == [[True, False, True, True, False, False]]
    # The response's edge stops the walk: with tokens 3.. padding, token 3 (which would join) does not.
    valid[0, 3:] = False
    cluster = saliency_clusters_reference(hidden, saliency, valid, NLFTConfig())
    assert cluster.tolist() == [[True, False, True, False, False, False]]
