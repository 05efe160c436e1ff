"""Saliency clusters: the neighbours that the base view's hidden states group with each saliency token.

Two implementations of the authors' ``token_cluster`` walk, picked by backend (``WALKS``):

- ``kernel`` (backends ``triton`` and ``cuda``: CUDA tensors, or the CPU under the Triton
  interpreter): ``ops/cluster_kernels.py``, one program per sample, one launch, no host sync.
- ``batched`` (backends ``cpp`` and ``torch``, and hidden sizes beyond the kernel's tile): one
  walk per saliency token, all advancing together, one batched step per position: each walk
  goes left until its first rejected neighbour (or the sample's edge), then turns and goes
  right from the saliency token with the centre it has carried so far. A walk accepts at most
  ``n - 1`` neighbours of its ``n``-row sample and spends one step on each of its two stops, so
  ``n`` steps cover it: O(max sample length) tensor ops, no per-token loop; it syncs with the
  host to size the batch (free on the CPU, where these backends run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.cluster_kernels import cluster_walk, cluster_walk_fits
from nlft_kernels.ops.contracts import acc_dtype

# Walks that have stopped are dropped from the batch every this many steps (one host sync).
_COMPACT_EVERY = 16
# The walk each backend takes (None: the kernel on CUDA tensors, the batched walk elsewhere).
WALKS = {"triton": "kernel", "cuda": "kernel", "cpp": "batched", "torch": "batched"}


def saliency_clusters(
    hidden_states: torch.Tensor,
    saliency: torch.Tensor,
    valid: torch.Tensor | None = None,
    sample_ids: torch.Tensor | None = None,
    config: NLFTConfig = NLFTConfig(),
    backend: str | None = None,
) -> torch.Tensor:
    """Cluster neighbours of the saliency tokens, bool shaped like ``saliency``.

    hidden_states: [B, T, D] or [N, D] (any float dtype; compared in float32, float64 for float64) of the base view;
    saliency: [B, T] or [N] bool; valid: same shape, the response rows (default: all);
    sample_ids: [N] int, non-decreasing, for the flat form (rows of one sample are contiguous).
    From each saliency token, a walk moves left, then right, over consecutive valid rows of
    its sample, with ONE centre that starts at the token's state, becomes ``(centre + h) / 2``
    after each accepted neighbour and is carried from the left walk into the right walk (not
    reset); each direction stops at its first rejected neighbour or at the sample's edge.
    ``config.cluster_criterion`` says when a neighbour is accepted. Saliency tokens themselves
    are never cluster tokens. Equals :func:`nlft_kernels.reference.saliency_clusters_reference`.
    backend: a resolved backend name, which picks the walk (``WALKS``); None: the kernel on
    CUDA tensors, the batched walk elsewhere.
    """
    if hidden_states.shape[:-1] != saliency.shape:
        raise ValueError(
            f"hidden_states must have shape {tuple(saliency.shape)} + (D,), got {tuple(hidden_states.shape)}"
        )
    if not hidden_states.dtype.is_floating_point:
        raise ValueError(f"hidden_states must be a float tensor, got {hidden_states.dtype}")
    if hidden_states.device != saliency.device:
        raise ValueError(f"hidden_states is on {hidden_states.device} but saliency is on {saliency.device}")
    shape = saliency.shape
    rows = saliency.numel()
    valid = torch.ones_like(saliency, dtype=torch.bool) if valid is None else valid.bool()
    if sample_ids is None:
        steps = shape[-1] if saliency.dim() == 2 else rows
        sample_ids = torch.arange(rows, device=saliency.device) // steps
    seed = (saliency.bool() & valid).reshape(rows)
    if config.cluster_criterion == "off":
        return torch.zeros_like(seed).view(shape)
    hidden = hidden_states.reshape(rows, -1)
    if backend is not None and backend not in WALKS:
        raise ValueError(f"backend must be one of {tuple(WALKS)} (resolved) or None, got {backend!r}")
    walk = WALKS[backend] if backend is not None else "kernel" if hidden.is_cuda else "batched"
    if walk == "kernel" and cluster_walk_fits(hidden.shape[1], hidden.dtype):
        return cluster_walk(hidden, seed, valid.reshape(rows), sample_ids.reshape(rows), config).view(shape)
    return _batched_walk(hidden, seed, valid.reshape(rows), sample_ids.reshape(rows), config).view(shape)


def _batched_walk(hidden, seed, valid, sample_ids, config: NLFTConfig) -> torch.Tensor:
    """The batched walk (see the module docstring) over flat rows: cluster flags [N] bool."""
    rows = seed.numel()
    # Accepted steps per row, added without a boolean index (which would sync each step).
    hits = torch.zeros(rows, dtype=torch.int32, device=seed.device)
    starts = seed.nonzero().squeeze(1)
    if starts.numel() == 0:
        return hits > 0
    hidden = hidden.to(acc_dtype(hidden.dtype))
    # One walk per saliency token: it goes left first (direction -1) and turns right at its
    # first stop, back at its origin and with the centre carried from the left walk.
    origin = starts
    direction = torch.full_like(starts, -1)
    position = origin.clone()
    centre = hidden[origin]
    longest = int(torch.bincount(sample_ids[valid]).max())
    for step in range(1, longest + 1):
        position = position + direction
        inside = (position >= 0) & (position < rows)
        at = position.clamp(0, rows - 1)
        candidate = hidden[at]
        similarity = F.cosine_similarity(candidate, centre, dim=-1)
        if config.cluster_criterion == "distance":
            accepted = 1.0 - similarity > config.cluster_threshold
        else:
            accepted = similarity > config.cluster_threshold
        go_on = inside & valid[at] & (sample_ids[at] == sample_ids[origin]) & accepted
        hits.index_add_(0, at, go_on.to(hits.dtype))
        centre = torch.where(go_on[:, None], (centre + candidate) / 2, centre)
        # A left walk that stops turns right: back to its origin, keeping its centre.
        turn = ~go_on & (direction < 0)
        direction = torch.where(turn, -direction, direction)
        position = torch.where(turn, origin, position)
        alive = go_on | turn
        if step % _COMPACT_EVERY == 0:
            keep = alive.nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            origin, direction, position, centre = origin[keep], direction[keep], position[keep], centre[keep]
            continue
        # A walk that has stopped rightwards stays stopped: park it so far left of row 0 that
        # the steps left cannot bring it back, until it is compacted away.
        position = torch.where(alive, position, torch.full_like(position, -(rows + longest)))
    return (hits > 0) & ~seed
