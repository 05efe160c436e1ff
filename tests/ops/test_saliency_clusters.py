"""The saliency-cluster walks (the Triton kernel, interpreted here, and the batched torch walk)
against the reference's Python loops.

All follow the authors' ``token_cluster``: one running centre per saliency token, carried
from the left walk into the right walk. ``restart_reference`` below is the walk this package
did before (the centre reset for the right walk); the tests named ``carried`` build inputs on
which the two differ, so that a return of the restart would fail them.
"""

import functools
import math

import pytest
import torch

import nlft_kernels.reference as reference_module
from nlft_kernels import NLFTConfig, saliency_clusters
from nlft_kernels.ops.launch import cluster_walk_config
from nlft_kernels.ops.saliency_clusters import WALKS
from nlft_kernels.reference import nlft_loss_reference, saliency_clusters_reference
from tests._host_syncs import HostSyncCounter
from tests._inputs import generator, make_inputs, seed_of
from tests.conftest import backend_params
from tests.ops.test_nlft_linear_loss import LinearCase, fused
from tests.ops.test_nlft_loss import run_both
from tests.tolerances import assert_grad_close, assert_loss_close

# Every backend of the registry that computes on CPU tensors (skipped here with its reason).
BACKENDS = backend_params()
# The two walks, each through the backend that takes it: the kernel (Triton, interpreted on the
# CPU) and the batched torch walk.
WALK_BACKENDS = {"kernel": "triton", "batched": "torch"}
assert all(WALKS[backend] == walk for walk, backend in WALK_BACKENDS.items())
IMPLEMENTATIONS = {
    walk: functools.partial(
        lambda hidden, saliency, valid, config, backend: saliency_clusters(
            hidden, saliency, valid, config=config, backend=backend
        ),
        backend=backend,
    )
    for walk, backend in WALK_BACKENDS.items()
} | {"reference": saliency_clusters_reference}


def inputs(batch, steps, dim, seed):
    g = generator(seed)
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
@pytest.mark.parametrize("walk", WALK_BACKENDS)
def test_matches_reference(walk, criterion, threshold, seed):
    hidden, saliency, valid = inputs(6, 40, 8, seed)
    config = NLFTConfig(cluster_criterion=criterion, cluster_threshold=threshold)
    cluster = saliency_clusters(hidden, saliency, valid, config=config, backend=WALK_BACKENDS[walk])
    expected = saliency_clusters_reference(hidden, saliency, valid, config)
    assert torch.equal(cluster, expected)
    # The inputs exercise walks that accept neighbours and walks that stop before the sample ends.
    assert expected.any() and (valid & ~saliency & ~expected).any()
    assert not (cluster & ~valid).any() and not (cluster & saliency).any()


@pytest.mark.parametrize("walk", WALK_BACKENDS)
def test_flat_rows_with_sample_ids(walk):
    hidden, saliency, valid = inputs(5, 30, 6, seed=3)
    config = NLFTConfig()
    expected = saliency_clusters_reference(hidden, saliency, valid, config)
    sample_ids = torch.arange(5)[:, None].expand(5, 30)[valid]
    backend = WALK_BACKENDS[walk]
    cluster = saliency_clusters(hidden[valid], saliency[valid], sample_ids=sample_ids, config=config, backend=backend)
    assert expected.any()
    assert torch.equal(cluster, expected[valid])


def ragged_inputs(seed: int, samples: int, dim: int, dtype=torch.float32):
    """Flat rows of ``samples`` samples of 1 to 24 rows (sample ids from 3 on, some skipped), with
    padding rows (valid False) at sample ends and inside samples, and a saliency token on ~40% of
    the rows: [B, T]-free inputs for the flat form, and their [B, T] layout for the reference."""
    g = generator(seed)
    lengths = torch.randint(1, 25, (samples,), generator=g)
    lengths[:3] = torch.tensor([1, 2, 24])  # a one-row sample, a two-row one, a long one
    steps = int(lengths.max())
    hidden = torch.zeros(samples, steps, dim)
    valid = torch.zeros(samples, steps, dtype=torch.bool)
    smooth = torch.randn(samples, steps, dim, generator=g).cumsum(1)
    states = smooth * (torch.rand(samples, steps, 1, generator=g) < 0.7) + torch.randn(samples, steps, dim, generator=g)
    for b, n in enumerate(lengths.tolist()):
        hidden[b, :n] = states[b, :n]
        valid[b, :n] = True
        valid[b, n - 1] &= b % 3 != 1  # padding at the sample's end
        if n > 6 and b % 2 == 0:
            valid[b, n // 2] = False  # and a hole inside the sample
    saliency = (torch.rand(samples, steps, generator=g) < 0.4) & valid
    present = torch.arange(steps)[None, :] < lengths[:, None]
    sample_ids = (3 + 2 * torch.arange(samples))[:, None].expand(samples, steps)[present]
    return hidden.to(dtype), saliency, valid, present, sample_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("criterion, threshold", [("distance", 0.4), ("similarity", 0.2), ("similarity", -0.5)])
@pytest.mark.parametrize("walk", WALK_BACKENDS)
def test_ragged_samples_many_saliency_tokens(walk, criterion, threshold, dtype):
    """Samples of 1 to 24 rows as flat rows, padding at their ends and inside them, saliency on
    ~40% of the rows; the loose thresholds send walks to the samples' edges (and stop them
    there), the tight one stops most walks early."""
    seed = seed_of("ragged walk", criterion, threshold, dtype)
    hidden, saliency, valid, present, sample_ids = ragged_inputs(seed, samples=12, dim=24, dtype=dtype)
    config = NLFTConfig(cluster_criterion=criterion, cluster_threshold=threshold)
    expected = saliency_clusters_reference(hidden, saliency, valid, config)
    cluster = saliency_clusters(
        hidden[present], saliency[present], valid[present], sample_ids, config, backend=WALK_BACKENDS[walk]
    )
    assert torch.equal(cluster, expected[present])
    assert saliency.sum() > 40 and expected.any() and (valid & ~saliency & ~expected).any()
    # Some walk reaches a sample's first or last response row (its edge) as a cluster token.
    first = valid.int().argmax(1)
    last = valid.shape[1] - 1 - valid.flip(1).int().argmax(1)
    rows = torch.arange(valid.shape[0])
    assert (expected[rows, first] | expected[rows, last]).any()


def test_the_kernel_walk_never_waits_for_the_host():
    """One launch, no host sync (on a GPU: nothing that waits for the device)."""
    hidden, saliency, valid, present, sample_ids = ragged_inputs(seed_of("sync-free walk"), samples=4, dim=8)
    flat = hidden[present], saliency[present], valid[present], sample_ids
    with HostSyncCounter() as syncs:
        cluster = saliency_clusters(*flat, backend="triton")
    assert syncs.count == 0, syncs.sites
    assert cluster.any()


def test_hidden_sizes_beyond_the_kernel_tile_take_the_batched_walk():
    dim = 16385
    assert cluster_walk_config(16384, torch.float32) is not None and cluster_walk_config(dim, torch.float32) is None
    hidden, saliency, valid = inputs(2, 6, dim, seed=8)
    config = NLFTConfig(cluster_criterion="similarity", cluster_threshold=-0.3)
    cluster = saliency_clusters(hidden, saliency | (torch.arange(6) == 2), valid, config=config, backend="triton")
    expected = saliency_clusters_reference(hidden, saliency | (torch.arange(6) == 2), valid, config)
    assert expected.any() and torch.equal(cluster, expected)


def test_walks_never_cross_samples():
    # Two samples of orthogonal states: with the distance criterion every neighbour is accepted,
    # so the walk runs to the end of its own sample and must stop there.
    hidden = torch.eye(8).repeat(2, 1).view(2, 8, 8)
    saliency = torch.zeros(2, 8, dtype=torch.bool)
    saliency[0, 6] = True
    for backend in WALK_BACKENDS.values():
        cluster = saliency_clusters(hidden, saliency, backend=backend)
        assert cluster[0].tolist() == [True] * 6 + [False, True] and not cluster[1].any(), backend


def test_off_and_no_saliency():
    hidden, saliency, valid = inputs(2, 10, 4, seed=4)
    for backend in WALK_BACKENDS.values():
        off = NLFTConfig(cluster_criterion="off")
        assert not saliency_clusters(hidden, saliency, valid, config=off, backend=backend).any()
        assert not saliency_clusters(hidden, torch.zeros_like(saliency), valid, backend=backend).any()


@pytest.mark.parametrize("walk", WALK_BACKENDS)
def test_long_walks(walk):
    # Longer than the batched walk's compaction period, with walks that stop at different steps.
    hidden, saliency, valid = inputs(3, 90, 4, seed=5)
    config = NLFTConfig(cluster_criterion="similarity", cluster_threshold=-0.3)
    expected = saliency_clusters_reference(hidden, saliency, valid, config)
    assert torch.equal(saliency_clusters(hidden, saliency, valid, config=config, backend=WALK_BACKENDS[walk]), expected)
    covered = (expected | saliency).int()
    longest = max(len(run) for row in covered.tolist() for run in "".join(map(str, row)).split("0"))
    assert longest > 16 and (valid & ~saliency & ~expected).any()


def test_errors():
    hidden, saliency, valid = inputs(2, 10, 4, seed=6)
    with pytest.raises(ValueError, match="hidden_states"):
        saliency_clusters(hidden[:, :5], saliency, valid)
    with pytest.raises(ValueError, match="hidden_states"):
        saliency_clusters(hidden.long(), saliency, valid)
    with pytest.raises(ValueError, match="backend"):
        saliency_clusters(hidden, saliency, valid, backend="auto")


# The walk as it was before: the centre is reset to the saliency token's state for the right
# walk. Not the authors' walk; here only to show that the tests' inputs tell them apart.
restart_reference = functools.partial(saliency_clusters_reference, carry_centre=False)


# Two samples of 5 rows, D = 2, the authors' criterion (cosine distance > 0.4), worked by hand.
# Sample 0, saliency token 2 = (1, 0):
#   left:  row 1 (0, 1): distance 1 to (1, 0), joins; centre (0.5, 0.5).
#          row 0 (1, 1): distance 0 to (0.5, 0.5), stops.
#   right: row 3 (0, 1): distance 1 - 0.707 = 0.293 to the carried (0.5, 0.5), stops.
#   (Restarted at (1, 0) row 3 would join at distance 1, then row 4 (1, -1) at distance 1.)
# Sample 1 (row 4 is padding), saliency token 1 = (1, 0):
#   left:  row 0 (0, 1): distance 1, joins; centre (0.5, 0.5); the sample's edge, stops.
#   right: row 2 (1, -1): distance 1 to (0.5, 0.5), joins; centre (0.75, -0.25).
#          row 3 (0, 1): similarity -0.25 / 0.791 = -0.316, distance 1.316, joins; centre (0.375, 0.375).
#          row 4 is padding (it would join at distance 1): the response's edge, stops.
#   (Restarted at (1, 0) row 2 (1, -1) is at distance 0.293 and stops the right walk.)
HAND_HIDDEN = torch.tensor(
    [
        [[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, -1.0]],
        [[0.0, 1.0], [1.0, 0.0], [1.0, -1.0], [0.0, 1.0], [1.0, -1.0]],
    ]
)
HAND_SALIENCY = torch.tensor([[False, False, True, False, False], [False, True, False, False, False]])
HAND_VALID = torch.tensor([[True] * 5, [True, True, True, True, False]])
HAND_CARRIED = [[False, True, False, False, False], [True, False, True, True, False]]
HAND_RESTARTED = [[False, True, False, True, True], [True, False, False, False, False]]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_hand_worked_carried_centre(implementation):
    cluster = IMPLEMENTATIONS[implementation](HAND_HIDDEN, HAND_SALIENCY, HAND_VALID, NLFTConfig())
    assert cluster.tolist() == HAND_CARRIED
    assert restart_reference(HAND_HIDDEN, HAND_SALIENCY, HAND_VALID, NLFTConfig()).tolist() == HAND_RESTARTED


def angle_states(batch, steps, seed, turn_degrees):
    """[B, T, 2] states at angles that random-walk ``turn_degrees`` (s.d.) per row, of norms in
    [0.5, 1.5]: in two dimensions the centre carried from the left walk points elsewhere than
    the saliency token's state, so the right walks of the two variants often decide differently."""
    g = generator(seed)
    angle = (torch.randn(batch, steps, generator=g) * math.radians(turn_degrees)).cumsum(1)
    norm = 0.5 + torch.rand(batch, steps, generator=g)
    return torch.stack([angle.cos(), angle.sin()], -1) * norm[..., None]


_C60, _S60, _R2 = 0.5, math.sqrt(3) / 2, math.sqrt(0.5)
# Rows s - 2 .. s + 1 around a saliency token s (D = 2) on which the carried centre and the
# restarted one decide row s + 1 differently, whatever the walks around them:
# distance > t for 0.3 < t < 1: row s - 1 (0, 1) joins (distance 1 to (1, 0)), the centre is
#   (0.5, 0.5), row s - 2 (1, 1) stops the left walk (distance 0); row s + 1 (1, -1) is at
#   distance 1 from the carried centre (joins) and 1 - cos 45 = 0.293 from the restarted (1, 0).
# similarity > 0.4: row s - 1 at 60 degrees joins (similarity 0.5), the centre is at 30 degrees,
#   row s - 2 (0, -1) stops the left walk (similarity -0.5); row s + 1 at -45 degrees is 75
#   degrees from the carried centre (similarity 0.26, stops) and 45 from the restarted one
#   (similarity 0.71, joins).
PLANTED = {
    "distance": [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (1.0, -1.0)],
    "similarity": [(0.0, -1.0), (_C60, _S60), (1.0, 0.0), (_R2, -_R2)],
}


def planting_site(saliency: torch.Tensor, valid: torch.Tensor) -> int | None:
    """A saliency token s of one sample ([T] masks) with s - 1 and s + 1 ordinary response rows
    and s + 2 no saliency token (whose walk could reach s + 1 either way), or None."""
    steps = saliency.numel()
    for s in range(1, steps - 1):
        ordinary = valid[s - 1] and valid[s + 1] and not saliency[s - 1] and not saliency[s + 1]
        if saliency[s] and ordinary and (s + 2 >= steps or not saliency[s + 2]):
            return s
    return None


def plant(hidden: torch.Tensor, saliency: torch.Tensor, valid: torch.Tensor, samples, criterion: str) -> list:
    """Plant ``PLANTED[criterion]`` (in the first two of the D dimensions, the rest 0) around one
    saliency token of each of ``samples`` that has a site; returns the planted samples."""
    planted = []
    for b in samples:
        s = planting_site(saliency[b], valid[b])
        if s is None:
            continue
        for offset, state in zip(range(-2, 2), PLANTED[criterion], strict=True):
            if s + offset >= 0:
                hidden[b, s + offset] = 0.0
                hidden[b, s + offset, :2] = torch.tensor(state)
        planted.append(b)
    return planted


# (criterion, threshold, per-row turn of the background states)
WALK_SETTINGS = [("distance", 0.4, 150.0), ("distance", 0.9, 180.0), ("similarity", 0.4, 60.0)]


@pytest.mark.parametrize("criterion, threshold, turn", WALK_SETTINGS)
@pytest.mark.parametrize("walk", WALK_BACKENDS)
def test_carried_centre_random_states(walk, criterion, threshold, turn):
    seed = seed_of("carried", criterion, threshold)
    hidden = angle_states(8, 40, seed, turn)
    g = generator(seed)
    valid = torch.ones(8, 40, dtype=torch.bool)
    for b in range(8):
        valid[b, 40 - 3 * b :] = False
    saliency = (torch.rand(8, 40, generator=g) < 0.12) & valid
    planted = plant(hidden, saliency, valid, range(8), criterion)
    config = NLFTConfig(cluster_criterion=criterion, cluster_threshold=threshold)
    expected = saliency_clusters_reference(hidden, saliency, valid, config)
    restarted = restart_reference(hidden, saliency, valid, config)
    # The inputs tell the two walks apart in most planted samples (in the others another
    # saliency token's walk may reach row s + 1 under both).
    differs = (expected != restarted)[planted].any(dim=1)
    assert len(planted) >= 4 and 2 * differs.sum() >= len(planted)
    backend = WALK_BACKENDS[walk]
    assert torch.equal(saliency_clusters(hidden, saliency, valid, config=config, backend=backend), expected)
    sample_ids = torch.arange(8)[:, None].expand(8, 40)[valid]
    flat = saliency_clusters(hidden[valid], saliency[valid], sample_ids=sample_ids, config=config, backend=backend)
    assert torch.equal(flat, expected[valid])


@pytest.mark.parametrize("origin", [1, 14, 15, 16, 17, 31, 38])
def test_right_walk_survives_compaction(origin):
    # Equal states join everywhere (similarity 1 > -1): the left walk reaches the sample's edge
    # and turns at step origin + 1, on or around a compaction step (every 16); the right walk
    # must then go on to the other edge.
    hidden = torch.ones(2, 40, 3)
    saliency = torch.zeros(2, 40, dtype=torch.bool)
    saliency[0, origin] = True
    valid = torch.ones(2, 40, dtype=torch.bool)
    config = NLFTConfig(cluster_criterion="similarity", cluster_threshold=-1.0)
    cluster = saliency_clusters(hidden, saliency, valid, config=config)
    assert torch.equal(cluster, saliency_clusters_reference(hidden, saliency, valid, config))
    assert cluster[0].sum() == 39 and not cluster[0, origin] and not cluster[1].any()


def loss_inputs(seed: int, criterion: str, wrong_too: bool = True):
    """make_inputs' samples (every kind of saliency token) with angle states for the walks, the
    pattern of ``PLANTED`` around a saliency token of a correct sample and (``wrong_too``) of a
    wrong one. Saliency does not depend on the hidden states (nor, for correct samples, on the
    base view), so the reference without them says where the saliency tokens are."""
    x = make_inputs(8, 20, 64, seed=seed)
    x.hidden = angle_states(8, 20, seed, 150.0 if criterion == "distance" else 60.0)
    _, details = nlft_loss_reference(x.base.detach(), x.labels, x.correct, x.standard, x.judge, return_details=True)
    valid = x.labels != -100
    correct = plant(x.hidden, details["saliency"], valid, x.correct.nonzero().flatten().tolist()[:1], criterion)
    wrong = plant(x.hidden, details["saliency"], valid, (~x.correct).nonzero().flatten().tolist(), criterion)
    assert correct and (wrong or not wrong_too)
    return x


def assert_restart_differs(x, config, cluster, saliency, wrong_too: bool = True):
    """The reference's clusters differ from the restart variant's on these inputs, in a correct
    sample (and a wrong one), so that the cluster weights (and the loss) depend on the walk."""
    restarted = restart_reference(x.hidden, saliency, x.labels != -100, config)
    differs = (restarted != cluster).any(dim=1)
    assert differs[x.correct].any() and (differs[~x.correct].any() or not wrong_too)


@pytest.mark.parametrize("criterion", ["distance", "similarity"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_carried_centre_in_the_loss(backend, criterion, monkeypatch):
    x = loss_inputs(seed_of("carried loss", criterion), criterion)
    config = NLFTConfig(cluster_criterion=criterion, cluster_threshold=0.4)
    (loss, grad, details), (ref, ref_grad, ref_details) = run_both(x, backend=backend, hidden=True, config=config)
    assert_restart_differs(x, config, ref_details["cluster"], ref_details["saliency"])
    for name in ("saliency", "cluster", "killed"):
        assert torch.equal(getattr(details, name), ref_details[name]), name
    assert_loss_close(loss, ref)
    assert_grad_close(grad, ref_grad, torch.float32)
    # With the restart walk in the reference some token's loss is another number, by far more
    # than the tolerance: the walk matters.
    monkeypatch.setattr(reference_module, "saliency_clusters_reference", restart_reference)
    _, restarted = reference_with_clusters(x, config, x.base.detach().double())
    token_loss = ref_details["token_loss"]
    assert (restarted["token_loss"] - token_loss).abs().max() > 1e-2 * token_loss.abs().max()


def reference_with_clusters(x, config, base):
    """(loss, details) of the reference on ``base`` with the clusters walking ``x.hidden``."""
    return nlft_loss_reference(
        base, x.labels, x.correct, x.standard, x.judge, config, hidden_states=x.hidden, return_details=True
    )


@pytest.mark.parametrize("chunk_size", [7, 45])
def test_carried_centre_in_the_fused_linear_loss(chunk_size):
    """nlft_linear_loss walks its ``hidden`` argument through the same clusters: 7 rows per
    chunk splits every 20-row sample, 45 holds two whole ones. (The base view, and so the
    saliency of wrong samples, follows the hidden states here: the pattern is planted in a
    correct sample only.)"""
    seed = seed_of("carried linear", chunk_size)
    x = loss_inputs(seed, "distance", wrong_too=False)
    vocab, dim = x.standard.shape[-1], x.hidden.shape[-1]
    g = generator(seed)
    weight = (3 * torch.randn(vocab, dim, generator=g)).requires_grad_()
    bias = torch.randn(vocab, generator=g).requires_grad_()
    hidden = x.hidden.clone().requires_grad_()
    case = LinearCase(hidden, weight, bias, x.labels, x.correct, x.standard, x.judge)
    config = NLFTConfig()
    loss, grads, details = fused(case, x.standard, x.judge, config=config, chunk_size=chunk_size)
    exact = [p.detach().double().requires_grad_() for p in (hidden, weight, bias)]
    ref, ref_details = reference_with_clusters(x, config, exact[0] @ exact[1].T + exact[2])
    ref_grads = torch.autograd.grad(ref, exact)
    assert_restart_differs(x, config, ref_details["cluster"], ref_details["saliency"], wrong_too=False)
    for name in ("saliency", "cluster", "killed"):
        assert torch.equal(getattr(details, name), ref_details[name]), name
    assert_loss_close(loss, ref)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_grad_close(grad, ref_grad, torch.float32)
