"""The saliency-cluster walk as one Triton kernel (``saliency_clusters`` on the ``triton`` and
``cuda`` backends): the authors' ``token_cluster`` with one program per sample, no host sync.

Launch shape: ``ops/launch.py`` (``cluster_walk_config``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.launch import cluster_walk_config
from nlft_kernels.ops.tl_utils import tl_acc

# torch.nn.functional.cosine_similarity's eps: each norm is clamped to it.
COSINE_EPS = tl.constexpr(1e-8)


@triton.jit
def _walk_accepts(hidden_ptr, stride_h, k, cols, mask, centre, threshold, DISTANCE: tl.constexpr, ACC: tl.constexpr):
    """(accepted, h_k): whether row ``k`` joins the cluster of ``centre`` [BLOCK_D] in ACC.

    cos = h . c / (max(|h|, eps) max(|c|, eps)) as torch's cosine_similarity, compared without
    the division: cos > t  <=>  h . c > t * norms (norms > 0); 1 - cos > t  <=>  h . c < (1 - t) * norms.
    """
    h = tl.load(hidden_ptr + k * stride_h + cols, mask=mask, other=0.0).to(ACC)
    eps2 = COSINE_EPS * COSINE_EPS
    norms = tl.sqrt(tl.maximum(tl.sum(h * h, axis=0), eps2) * tl.maximum(tl.sum(centre * centre, axis=0), eps2))
    dot = tl.sum(h * centre, axis=0)
    if DISTANCE:
        accepted = dot < (1.0 - threshold) * norms
    else:
        accepted = dot > threshold * norms
    return accepted, h


@triton.jit
def _may_step(seed_ptr, valid_ptr, sample_ptr, k, sample, N):
    """Row ``k`` is inside [0, N), in ``sample`` and a response row (its seed flag read too)."""
    inside = (k >= 0) & (k < N)
    same = tl.load(sample_ptr + k, mask=inside, other=-1) == sample
    valid = tl.load(valid_ptr + k, mask=inside & same, other=0) != 0
    return inside & same & valid


@triton.jit
def _walk(
    hidden_ptr, stride_h, seed_ptr, valid_ptr, sample_ptr, cluster_ptr, N,
    seed, step: tl.constexpr, sample, cols, mask, centre, threshold, DISTANCE: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One direction (``step`` -1: left, +1: right) of a seed's walk: rows ``seed + step``,
    ``seed + 2 step``, ... of ``sample`` while each is a response row that ``_walk_accepts``;
    each accepted non-seed row marked in ``cluster``, the centre moved to ``(centre + h) / 2``.
    Returns the centre, carried into the next direction."""
    k = seed + step
    go = _may_step(seed_ptr, valid_ptr, sample_ptr, k, sample, N)
    while go:
        accepted, h = _walk_accepts(hidden_ptr, stride_h, k, cols, mask, centre, threshold, DISTANCE, ACC)
        mark = accepted & (tl.load(seed_ptr + k) == 0)
        tl.store(cluster_ptr + k, tl.full([], 1, tl.int8), mask=mark)
        centre = tl.where(accepted, (centre + h) * 0.5, centre)
        k += step
        go = accepted & _may_step(seed_ptr, valid_ptr, sample_ptr, k, sample, N)
    return centre


@triton.jit
def _cluster_walk_kernel(
    hidden_ptr,
    stride_h,
    seed_ptr,
    valid_ptr,
    sample_ptr,
    cluster_ptr,
    N,
    D,
    threshold,
    DISTANCE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """Grid N: program ``r`` walks the sample that starts at row ``r`` (``sample[r] !=
    sample[r - 1]``); every other program reads two ids and returns.

    For each seed (saliency & valid) of its sample, in order: the centre [D] (ACC, registers)
    starts at the seed's state; the walk goes left while the neighbour is a response row of the
    sample and its cosine test against the centre accepts it (``DISTANCE``: 1 - cos > threshold,
    else cos > threshold), marking it and moving the centre to ``(centre + h) / 2``; then from
    the seed to the right with the centre it carried. Seeds are never marked. Reads: int64
    sample ids, int8 seed/valid flags of the rows walked over, and per walk step one hidden row
    [D] (any float dtype, unit stride along D). Writes: int8 ``cluster`` [N] of accepted rows
    (zero-initialised by the caller). ``D <= BLOCK_D``.
    """
    row = tl.program_id(0).to(tl.int64)
    sample = tl.load(sample_ptr + row)
    before = tl.load(sample_ptr + row - 1, mask=row > 0, other=0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    if (row == 0) | (before != sample):
        p = row
        in_sample = p >= 0
        while in_sample:
            is_seed = tl.load(seed_ptr + p) != 0
            if is_seed:
                centre = tl.load(hidden_ptr + p * stride_h + cols, mask=mask, other=0.0).to(ACC)
                # Left walk, then the right walk from the seed with the centre carried over.
                centre = _walk(
                    hidden_ptr, stride_h, seed_ptr, valid_ptr, sample_ptr, cluster_ptr, N,
                    p, -1, sample, cols, mask, centre, threshold, DISTANCE, ACC,
                )  # fmt: skip
                centre = _walk(
                    hidden_ptr, stride_h, seed_ptr, valid_ptr, sample_ptr, cluster_ptr, N,
                    p, 1, sample, cols, mask, centre, threshold, DISTANCE, ACC,
                )  # fmt: skip
            p += 1
            in_sample = p < N
            in_sample = in_sample & (tl.load(sample_ptr + p, mask=in_sample, other=-1) == sample)


def cluster_walk_fits(dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel holds a centre of ``dim`` entries in registers (``cluster_walk_config``)."""
    return cluster_walk_config(dim, dtype) is not None


def cluster_walk(
    hidden: torch.Tensor, seed: torch.Tensor, valid: torch.Tensor, sample_ids: torch.Tensor, config: NLFTConfig
) -> torch.Tensor:
    """Cluster flags [N] bool of flat ``hidden`` [N, D] (any float dtype), ``seed`` [N] bool
    (saliency & valid), ``valid`` [N] bool and non-decreasing ``sample_ids`` [N]: one launch, no
    host sync. ``config.cluster_criterion`` is ``"distance"`` or ``"similarity"``."""
    n, dim = hidden.shape
    launch = cluster_walk_config(dim, hidden.dtype)
    if launch is None:
        raise ValueError(f"the cluster-walk kernel holds at most the hidden sizes of cluster_walk_config, got D={dim}")
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    cluster = torch.zeros(n, dtype=torch.int8, device=hidden.device)
    _cluster_walk_kernel[(n,)](
        hidden,
        hidden.stride(0),
        seed.to(torch.int8),
        valid.to(torch.int8),
        sample_ids.to(torch.int64).contiguous(),
        cluster,
        n,
        dim,
        float(config.cluster_threshold),
        DISTANCE=config.cluster_criterion == "distance",
        BLOCK_D=launch.block_v,
        ACC=tl_acc(hidden.dtype),
        num_warps=launch.num_warps,
    )
    return cluster.bool()
