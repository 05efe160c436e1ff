"""Launch configuration of the Triton kernels: one function per kernel family.

The same functions feed the launches in ``ops/``, the tests and the ahead-of-time compile
(``tests/ops/compile_kernels.py``), so what is compiled and tested is what runs.

A kernel family streams ``streams`` rows of length V at once (the base logits, plus the
standard and judge logits when they are given as logits). Each thread owns, per stream, one
16-byte vector of each ``BLOCK_V`` tile (8 bfloat16/float16, 4 float32 or 2 float64 entries: one
128-bit load) and keeps a running (max, sum) per entry it owns (``ops/tl_utils.py``), so the
registers a thread needs grow with the streams times the entries per thread, not with the tile;
the tile is those entries times the threads (``NUM_WARPS`` warps), a power of two (``tl.arange``
requires it), no larger than the vocabulary's power of two. ``TUNED`` overrides the rule for
measured shapes: it is filled from GPU measurements (``python -m benchmarks.gpu_suite``) and
empty until a GPU has been lent.

Eviction hints (``LaunchConfig.evict``, on by default): the NLFT row pass reads the base row
with ``evict_last`` in its first sweep, so that its second sweep (the gradient) can find it in L2,
and the teacher rows, the second sweep and the gradient stores with ``evict_first``; the label
log-prob kernels stream with ``evict_first``. Whether this pays (a base row of V=128256 bfloat16
is 250 KiB: L2 holds the rows in flight only with about one row per SM) waits for a GPU
measurement: the launch tuning of ``benchmarks.gpu_suite`` toggles it, and times it against the
CUDA row pass with the base row held on chip (``cuda_row_blocks``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nlft_kernels.ops.contracts import acc_dtype

# Kernel families: the NLFT row pass (`_nlft_fwd_kernel`, 1-3 streams), the label log-probs
# forward and backward (`_token_logprobs_kernel` / `_bwd_kernel`, 1 stream) and the row scaling
# of the per-sample fix-up (`_scale_rows_kernel`, 1 stream).
FAMILIES = ("row_pass", "token_logprobs", "scale_rows")

# Bytes of one stream's tile that one thread loads and owns: one 128-bit vector.
VECTOR_BYTES = 16
# Warps of a program: 256 threads; with three streams of 16-bit logits (8 entries each) about
# 80 registers a thread, so two or three programs (rows) per SM and 48 KiB or more in flight.
NUM_WARPS = 8
MIN_BLOCK_V = 128
MAX_BLOCK_V = 16384


@dataclass(frozen=True)
class LaunchConfig:
    """``BLOCK_V`` (a power of two), ``num_warps`` and the eviction hints (``evict``) of one launch."""

    block_v: int
    num_warps: int
    evict: bool = True

    def __post_init__(self) -> None:
        if self.block_v < 1 or self.block_v & (self.block_v - 1):
            raise ValueError(f"BLOCK_V must be a power of two, got {self.block_v}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two up to 32, got {self.num_warps}")


def vocab_bucket(vocab: int) -> int:
    """The power of two at or above ``vocab``: the key of ``TUNED`` (e.g. 50257 -> 65536)."""
    return 1 << max(vocab - 1, 0).bit_length()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# (family, vocab bucket, streams, dtype name) -> measured best LaunchConfig. Filled from a GPU
# run; every entry is compiled by the AOT test like the rule's choices.
TUNED: dict[tuple[str, int, int, str], LaunchConfig] = {}


def heuristic_config(vocab: int, streams: int, dtype: torch.dtype) -> LaunchConfig:
    """The rule: ``NUM_WARPS`` warps, each thread owning one ``VECTOR_BYTES`` vector per stream
    of a tile (a tile of 2048 16-bit, 1024 float32 or 512 float64 entries), whatever the number
    of streams (each adds that vector's running statistics to a thread's registers; the AOT
    compile checks there are no spills). Vocabularies below the tile get the tile of their power
    of two (at least ``MIN_BLOCK_V``) and as many warps as it fills, at least one."""
    per_thread = VECTOR_BYTES // dtype.itemsize
    block = max(MIN_BLOCK_V, min(vocab_bucket(vocab), per_thread * 32 * NUM_WARPS, MAX_BLOCK_V))
    return LaunchConfig(block, max(1, min(NUM_WARPS, block // (per_thread * 32))))


def launch_config(family: str, vocab: int, streams: int, dtype: torch.dtype) -> LaunchConfig:
    """The configuration a ``family`` kernel launches with for rows of ``vocab`` entries,
    ``streams`` rows read at once and logits of ``dtype``: ``TUNED`` if measured, else the rule."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not 1 <= streams <= 3:
        raise ValueError(f"streams must be 1, 2 or 3, got {streams}")
    tuned = TUNED.get((family, vocab_bucket(vocab), streams, _dtype_name(dtype)))
    return tuned if tuned is not None else heuristic_config(vocab, streams, dtype)


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the base view's gradient rows for logits of ``dtype``.

    float16 gets float32: the stored rows are multiplied by ``grad_output`` only in backward,
    and GradScaler's factor (2**16) arrives there; before it, entries below 6e-8 (a softmax
    of 1e-6 times a row scale of 1e-2) would underflow to 0 in float16. Autograd casts the
    returned gradient to float16 after the multiplication. Other dtypes keep theirs (bfloat16
    has float32's range).
    """
    return torch.float32 if dtype == torch.float16 else dtype


def row_pass_buffers(base: torch.Tensor, rows: int, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row pass's outputs but saliency, as every backend allocates them: stats [3, N] in ACC
    and, with ``compute_grad``, the gradient shaped like ``base`` in ``grad_dtype``."""
    stats = torch.empty(3, rows, dtype=acc_dtype(base.dtype), device=base.device)
    grad = torch.empty(base.shape, dtype=grad_dtype(base.dtype), device=base.device) if compute_grad else None
    return stats, grad


# ---------------------------------------------------------------------------------------------
# The CUDA row pass (backend "cuda", csrc/cuda/row_pass_kernel.cu) launches one block per row,
# whose second sweep reads the base row again (from L2 if it is still there), or, on sm_90, the
# on-chip kernel: a thread-block cluster of k blocks per row, each keeping its slice of
# ceil(V / k) base entries in shared memory from the first sweep to the second, the statistics
# merged through distributed shared memory; the base row is then read from DRAM once. Which is
# faster (and against the Triton kernel's L2 eviction hints) is measured by the GPU suite's
# launch tuning (``benchmarks.tune_launch``, key ``cuda_row_pass``); until then ``CUDA_TUNED``
# is empty and the CUDA row pass keeps one block per row.

# Cluster sizes of the on-chip kernel: powers of two up to the portable maximum of 8 blocks.
ON_CHIP_CLUSTERS = (1, 2, 4, 8)
# Shared memory kept for the on-chip kernel's static part (its pairs and the reduction's scratch,
# three pairs per warp: under 2 KiB in float64, tests/csrc/test_on_chip_launch.py checks the AOT
# report) out of a block's opt-in maximum.
ON_CHIP_STATIC_SMEM = 2048
# Entries per 16-byte-class load of the CUDA kernel (kVec): slices are multiples of it.
_CUDA_VEC = 8


@dataclass(frozen=True)
class CudaDevice:
    """What the CUDA row pass's choice needs to know of a GPU: its compute capability and the
    most shared memory a block may opt into (``cudaDevAttrMaxSharedMemoryPerBlockOptin``)."""

    capability: tuple[int, int]
    smem_per_block_optin: int

    @property
    def arch(self) -> str:
        """``"sm_90"``: the key of ``CUDA_TUNED``'s entries measured on this architecture."""
        return f"sm_{self.capability[0]}{self.capability[1]}"

    @classmethod
    def of(cls, index: int) -> CudaDevice:
        props = torch.cuda.get_device_properties(index)
        # torch < 2.7 reports neither figure: the default 48 KiB per block is a safe lower bound.
        optin = getattr(props, "shared_memory_per_block_optin", None) or getattr(
            props, "shared_memory_per_block", 48 * 1024
        )
        return cls((props.major, props.minor), optin)


# An H100 / H200: sm_90, 227 KiB of shared memory per block.
HOPPER = CudaDevice((9, 0), 227 * 1024)

# (architecture, vocab bucket, streams, dtype name) -> blocks per row of the CUDA row pass with a
# gradient (0: one block per row; k: the on-chip kernel with clusters of k), as measured on that
# architecture (another one, with other shared memory and L2, keeps one block per row).
CUDA_TUNED: dict[tuple[str, int, int, str], int] = {}


def on_chip_slice_bytes(vocab: int, dtype: torch.dtype, blocks: int) -> int:
    """Shared memory of one block of the on-chip kernel: its slice of ``ceil(V / blocks)``
    entries, rounded up to whole 8-entry packs, in ``dtype`` (``on_chip_slice`` in csrc/nlft_row.h)."""
    per_block = -(-vocab // blocks)
    return -(-per_block // _CUDA_VEC) * _CUDA_VEC * dtype.itemsize


def on_chip_clusters(vocab: int, dtype: torch.dtype, device: CudaDevice = HOPPER) -> tuple[int, ...]:
    """The cluster sizes whose slices of a row of ``vocab`` entries of ``dtype`` fit a block's
    shared memory on ``device`` (on Hopper, V=128256 bfloat16: 2, 4, 8; float32: 4, 8)."""
    room = device.smem_per_block_optin - ON_CHIP_STATIC_SMEM
    return tuple(k for k in ON_CHIP_CLUSTERS if on_chip_slice_bytes(vocab, dtype, k) <= room)


def cuda_tuned_key(device: CudaDevice, vocab: int, streams: int, dtype: torch.dtype) -> tuple[str, int, int, str]:
    """The ``CUDA_TUNED`` key of a shape on ``device``: (architecture, vocab bucket, streams, dtype name)."""
    return (device.arch, vocab_bucket(vocab), streams, _dtype_name(dtype))


def cuda_row_blocks(vocab: int, streams: int, dtype: torch.dtype, device: CudaDevice, compute_grad: bool) -> int:
    """Blocks per row of the CUDA row pass (``RowPass::blocks_per_row``): ``CUDA_TUNED``'s entry
    for the device's architecture (sm_90 or newer) with a gradient when its slices fit the
    device, else 0 (one block per row)."""
    if not compute_grad or device.capability < (9, 0):
        return 0
    blocks = CUDA_TUNED.get(cuda_tuned_key(device, vocab, streams, dtype), 0)
    return blocks if blocks in on_chip_clusters(vocab, dtype, device) else 0


# ---------------------------------------------------------------------------------------------
# Traffic model: the bytes each kernel moves through device memory for one labelled row, by
# buffer, as its docstring states (tests/ops/test_traffic.py counts them in an interpreter run).


def row_pass_traffic(
    vocab: int,
    logits_dtype: torch.dtype,
    *,
    standard_logits: bool,
    judge_logits: bool,
    wrong: bool,
    grad_type: torch.dtype | None,
) -> dict[str, int]:
    """Bytes of ``_nlft_fwd_kernel`` for one labelled row: the base row twice with a gradient
    (once without), the standard row once when given as logits, the judge row once on rows of
    wrong samples when given as logits, the gradient row written once (``grad_type``, None
    without a gradient); one label entry per logits view. Per-row scalars (label, flags,
    scale, statistics: under 40 bytes) are not counted."""
    e = logits_dtype.itemsize
    sweeps = 2 if grad_type is not None else 1
    return {
        "base": (sweeps * vocab + 1) * e,
        "standard": (vocab + 1) * e if standard_logits else 0,
        "judge": (vocab + 1) * e if judge_logits and wrong else 0,
        "grad": vocab * grad_type.itemsize if grad_type is not None else 0,
    }


def token_logprobs_traffic(vocab: int, dtype: torch.dtype) -> dict[str, dict[str, int]]:
    """Bytes of the label log-prob kernels for one labelled row, by kernel and buffer: forward
    reads the row once and its label entry; backward reads the row once and writes its
    gradient row once (in the logits dtype)."""
    e = dtype.itemsize
    return {"forward": {"logits": (vocab + 1) * e}, "backward": {"logits": vocab * e, "grad": vocab * e}}


# ---------------------------------------------------------------------------------------------
# The saliency-cluster walk (``ops/cluster_kernels.py``): one program per sample holds the
# running centre [D] and one hidden row [D] in registers, so its tile spans the hidden size.

# Largest hidden size the walk holds in one tile: 16384 (Llama-3-405B's D) in float32, 4096 in
# float64 (for gradcheck); larger heads take the torch walk.
MAX_CLUSTER_BLOCK_D = {4: 16384, 8: 4096}
# Live elements per thread of one walk tile, by accumulator size, before the warps are raised:
# past it ptxas spilled (the row kernels' budget before their per-lane rework; float64 halves it).
_CLUSTER_LIVE_PER_THREAD = {4: 32, 8: 8}


def cluster_walk_config(dim: int, dtype: torch.dtype) -> LaunchConfig | None:
    """``BLOCK_D`` (as ``block_v``: the power of two at or above ``dim``, at least 16) and warps
    of ``_cluster_walk_kernel`` for hidden states [N, ``dim``] of ``dtype``: two live tiles
    (centre, row) of at most ``_CLUSTER_LIVE_PER_THREAD`` elements per thread each (half that in
    float64), at most 16 warps; None when ``dim`` is beyond ``MAX_CLUSTER_BLOCK_D``. The AOT
    compile for sm_80/sm_90 of every dtype at D = 8 .. 16384 has no spills."""
    acc_size = 8 if dtype == torch.float64 else 4
    block = max(16, vocab_bucket(dim))
    if block > MAX_CLUSTER_BLOCK_D[acc_size]:
        return None
    live = _CLUSTER_LIVE_PER_THREAD[acc_size] // (2 if acc_size == 8 else 1)
    return LaunchConfig(block, min(max(1, vocab_bucket(-(-block // (32 * live)))), 16))
