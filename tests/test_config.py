import dataclasses

import pytest

from nlft_kernels import NLFTConfig


def test_defaults_are_the_spec():
    cfg = NLFTConfig()
    assert (cfg.correct_threshold, cfg.saliency_power, cfg.cluster_power, cfg.other_power) == (0.95, 5, 0.3, 0.6)
    assert (cfg.ratio_threshold, cfg.judge_min_prob, cfg.sigmoid_center, cfg.sigmoid_scale) == (1.5, 0.01, 1.5, 2.0)
    assert (cfg.saliency_fraction, cfg.unlikelihood_clamp, cfg.nll_weight, cfg.loss_scale) == (0.06, 1e-5, 1.0, 10.0)
    assert cfg.ignore_index == -100
    assert (cfg.cluster_criterion, cfg.cluster_threshold) == ("distance", 0.4)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        NLFTConfig().loss_scale = 1.0


@pytest.mark.parametrize(
    "field, value",
    [
        ("correct_threshold", 1.0),
        ("correct_threshold", 0.0),
        ("saliency_power", 0.0),
        ("other_power", -1.0),
        ("ratio_threshold", 0.0),
        ("judge_min_prob", 1.0),
        ("saliency_fraction", 1.5),
        ("unlikelihood_clamp", 0.0),
        ("nll_weight", -0.1),
        ("loss_scale", 0.0),
        ("loss_scale", float("nan")),
        ("sigmoid_center", float("inf")),
        ("ignore_index", 1.5),
        ("cluster_criterion", "cosine"),
        ("cluster_threshold", 3.0),
        ("saliency_power", "5"),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        NLFTConfig(**{field: value})


def test_similarity_threshold_range():
    NLFTConfig(cluster_criterion="similarity", cluster_threshold=-0.5)
    with pytest.raises(ValueError, match="cluster_threshold"):
        NLFTConfig(cluster_criterion="similarity", cluster_threshold=1.5)
