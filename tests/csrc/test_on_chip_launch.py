"""The choice of the CUDA row pass's kernel (``launch.cuda_row_blocks``) and the on-chip
kernel's shared-memory plan, on the CPU: which cluster sizes fit a block's shared memory, that
the slices cover the row, that the rule keeps one block per row until a measurement says
otherwise, and that the binding refuses the on-chip kernel where it cannot run. The kernel
itself runs in tests/csrc/test_cuda_kernel.py (sm_90) and compiles in test_cuda_compile.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks import cuda_resources
from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops import launch
from nlft_kernels.ops.contracts import RuleConstants
from tests._inputs import make_inputs, seed_of
from tests.csrc import extension_or_skip

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "row_pass_kernel.cu"
# Hopper's most shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200).
HOPPER_OPTIN_SMEM = 227 * 1024
REAL_VOCABS = (32000, 50257, 128256, 151936)
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", (300, *REAL_VOCABS))
def test_clusters_fit_shared_memory_and_cover_the_row(vocab, dtype):
    fits = launch.on_chip_clusters(vocab, dtype)
    assert fits, "a cluster of 8 holds every vocabulary up to 151936 in float64"
    for k in launch.ON_CHIP_CLUSTERS:
        entries = launch.on_chip_slice_bytes(vocab, dtype, k) // dtype.itemsize
        assert entries % 8 == 0, "a slice is whole 8-entry packs: no pack straddles two blocks"
        assert k * entries >= vocab > k * (entries - 8), "the slices cover the row, with less than a pack to spare each"
        assert (k in fits) == (entries * dtype.itemsize <= launch.ON_CHIP_MAX_SLICE_BYTES)
    # Each larger cluster fits once a smaller one does.
    assert fits == launch.ON_CHIP_CLUSTERS[launch.ON_CHIP_CLUSTERS.index(fits[0]) :]


def test_headline_shapes():
    """V=128256: bfloat16 rows of 250 KiB in 2 slices of 125 KiB or more; float32 needs 4."""
    assert launch.on_chip_clusters(128256, torch.bfloat16) == (2, 4, 8)
    assert launch.on_chip_clusters(128256, torch.float32) == (4, 8)
    assert launch.on_chip_slice_bytes(128256, torch.bfloat16, 4) == 32064 * 2
    assert launch.on_chip_clusters(32000, torch.bfloat16) == (1, 2, 4, 8)


def test_the_rule_keeps_one_block_per_row_until_measured(monkeypatch):
    hopper, ampere = (9, 0), (8, 0)
    monkeypatch.setattr(launch, "CUDA_TUNED", {})
    assert launch.cuda_row_blocks(128256, 3, torch.bfloat16, hopper, True) == 0
    launch.CUDA_TUNED[(launch.vocab_bucket(128256), 3, "bfloat16")] = 4
    assert launch.cuda_row_blocks(128256, 3, torch.bfloat16, hopper, True) == 4
    assert launch.cuda_row_blocks(128000, 3, torch.bfloat16, hopper, True) == 4, "one entry per vocabulary bucket"
    assert launch.cuda_row_blocks(128256, 2, torch.bfloat16, hopper, True) == 0, "streams are part of the key"
    assert launch.cuda_row_blocks(128256, 3, torch.bfloat16, ampere, True) == 0, "clusters need sm_90"
    assert launch.cuda_row_blocks(128256, 3, torch.bfloat16, hopper, False) == 0, "only the gradient's sweep pays"
    launch.CUDA_TUNED[(launch.vocab_bucket(128256), 3, "float32")] = 2  # 250 KiB slices: do not fit
    assert launch.cuda_row_blocks(128256, 3, torch.float32, hopper, True) == 0


def test_the_constants_match_the_kernel():
    """The Python plan and the CUDA launcher agree: pack size, largest cluster, and the slice
    plus the kernel's static shared memory (from the committed ptxas report) within Hopper's
    per-block maximum."""
    source = SOURCE.read_text()
    assert int(re.search(r"constexpr int kVec = (\d+);", source).group(1)) == launch._CUDA_VEC
    assert int(re.search(r"constexpr int kMaxCluster = (\d+);", source).group(1)) == max(launch.ON_CHIP_CLUSTERS)
    report = json.loads(cuda_resources.OUT.read_text())
    on_chip = [v for v in report["variants"] if v["arch"] == "sm_90" and v["kernel"].startswith("row_pass_on_chip")]
    assert on_chip, "the committed report has the on-chip kernel's sm_90 variants"
    assert launch.ON_CHIP_MAX_SLICE_BYTES + max(v["smem_bytes"] for v in on_chip) <= HOPPER_OPTIN_SMEM


def test_the_binding_refuses_the_on_chip_kernel_where_it_cannot_run():
    ext = extension_or_skip()
    x = make_inputs(2, 3, 64, seed=seed_of("on chip refused"))
    wrong = (~x.correct).repeat_interleave(3)
    args = (x.base, x.standard, 1, x.judge, 1, x.labels.reshape(-1), wrong, torch.ones(6))
    kwargs = RuleConstants.of(NLFTConfig()).kwargs()
    with pytest.raises(RuntimeError, match="needs CUDA logits"):
        ext.first_stage(*args, **kwargs, compute_grad=True, blocks_per_row=2)
    with pytest.raises(RuntimeError, match=r"blocks_per_row must be in \[0, 8\]"):
        ext.first_stage(*args, **kwargs, compute_grad=True, blocks_per_row=16)
    stats, _, grad = ext.first_stage(*args, **kwargs, compute_grad=True, blocks_per_row=0)
    assert grad.shape == x.base.shape and torch.isfinite(stats).all()
