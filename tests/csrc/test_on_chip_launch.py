"""The choice of the CUDA row pass's kernel (``launch.cuda_row_blocks``) and the on-chip
kernel's shared-memory plan, on the CPU: which cluster sizes fit a block's shared memory, that
the slices cover the row, that the rule keeps one block per row until a measurement says
otherwise, and that the binding refuses the on-chip kernel where it cannot run. The kernel
itself runs in tests/csrc/test_cuda_kernel.py (sm_90) and compiles in test_cuda_compile.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import cuda_resources
from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops import launch
from nlft_kernels.ops.contracts import RuleConstants
from tests._inputs import make_inputs, seed_of
from tests.csrc import extension_or_skip

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCE = CSRC / "cuda" / "row_pass_kernel.cu"
ROOM = launch.HOPPER.smem_per_block_optin - launch.ON_CHIP_STATIC_SMEM
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
        assert (k in fits) == (entries * dtype.itemsize <= ROOM)
    # Each larger cluster fits once a smaller one does.
    assert fits == launch.ON_CHIP_CLUSTERS[launch.ON_CHIP_CLUSTERS.index(fits[0]) :]


def test_headline_shapes():
    """V=128256: bfloat16 rows of 250 KiB in 2 slices of 125 KiB or more; float32 needs 4."""
    assert launch.on_chip_clusters(128256, torch.bfloat16) == (2, 4, 8)
    assert launch.on_chip_clusters(128256, torch.float32) == (4, 8)
    assert launch.on_chip_slice_bytes(128256, torch.bfloat16, 4) == 32064 * 2
    assert launch.on_chip_clusters(32000, torch.bfloat16) == (1, 2, 4, 8)


def test_smaller_shared_memory_takes_larger_clusters():
    """A GPU with 99 KiB per block (sm_120) holds V=128256 bfloat16 only in 4 or 8 slices."""
    small = launch.CudaDevice((12, 0), 99 * 1024)
    assert launch.on_chip_clusters(128256, torch.bfloat16, small) == (4, 8)
    assert launch.on_chip_clusters(128256, torch.bfloat16) == (2, 4, 8)


def test_the_slices_match_the_kernels_plan(tmp_path):
    """``launch.on_chip_slice_bytes`` against ``nlft::on_chip_slice`` (csrc/nlft_row.h, which the
    launcher sizes its blocks with), compiled and run on the host, over a grid of vocabularies
    and cluster sizes."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    vocabs = [1, 7, 8, 9, 20, 100, 300, 4099, *REAL_VOCABS, 256000]
    program = tmp_path / "slices.cpp"
    program.write_text(
        '#include <cstdio>\n#include "nlft_row.h"\nint main() {\n'
        + "".join(
            f'  std::printf("%lld\\n", (long long)nlft::on_chip_slice({v}, {k}, {launch._CUDA_VEC}));\n'
            for v in vocabs
            for k in launch.ON_CHIP_CLUSTERS
        )
        + "}\n"
    )
    binary = tmp_path / "slices"
    subprocess.run([cxx, "-std=c++17", f"-I{CSRC}", str(program), "-o", str(binary)], check=True, timeout=120)
    got = [
        int(line) for line in subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.split()
    ]
    want = [launch.on_chip_slice_bytes(v, torch.int8, k) for v in vocabs for k in launch.ON_CHIP_CLUSTERS]
    assert got == want


def test_the_rule_keeps_one_block_per_row_until_measured(monkeypatch):
    hopper, ampere = launch.HOPPER, launch.CudaDevice((8, 0), 163 * 1024)
    monkeypatch.setattr(launch, "CUDA_TUNED", {})
    assert launch.cuda_row_blocks(128256, 3, torch.bfloat16, hopper, True) == 0
    launch.CUDA_TUNED[("sm_90", launch.vocab_bucket(128256), 3, "bfloat16")] = 4
    assert launch.cuda_row_blocks(128256, 3, torch.bfloat16, hopper, True) == 4
    assert launch.cuda_row_blocks(128000, 3, torch.bfloat16, hopper, True) == 4, "one entry per vocabulary bucket"
    assert launch.cuda_row_blocks(128256, 2, torch.bfloat16, hopper, True) == 0, "streams are part of the key"
    assert launch.cuda_row_blocks(128256, 3, torch.bfloat16, ampere, True) == 0, "clusters need sm_90"
    blackwell = launch.CudaDevice((10, 0), 227 * 1024)
    assert launch.cuda_row_blocks(128256, 3, torch.bfloat16, blackwell, True) == 0, "measured on sm_90 only"
    assert launch.cuda_row_blocks(128256, 3, torch.bfloat16, hopper, False) == 0, "only the gradient's sweep pays"
    launch.CUDA_TUNED[("sm_90", launch.vocab_bucket(128256), 3, "float32")] = 2  # 250 KiB slices: do not fit
    assert launch.cuda_row_blocks(128256, 3, torch.float32, hopper, True) == 0


def test_the_constants_match_the_kernel():
    """The Python plan and the CUDA launcher agree: pack size, largest cluster, and the room kept
    for the kernel's static shared memory (from the committed ptxas report)."""
    source = SOURCE.read_text()
    assert int(re.search(r"constexpr int kVec = (\d+);", source).group(1)) == launch._CUDA_VEC
    assert int(re.search(r"constexpr int kMaxCluster = (\d+);", source).group(1)) == max(launch.ON_CHIP_CLUSTERS)
    report = json.loads(cuda_resources.OUT.read_text())
    on_chip = [v for v in report["variants"] if v["arch"] == "sm_90" and v["kernel"].startswith("row_pass_on_chip")]
    assert on_chip, "the committed report has the on-chip kernel's sm_90 variants"
    assert max(v["smem_bytes"] for v in on_chip) <= launch.ON_CHIP_STATIC_SMEM


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
