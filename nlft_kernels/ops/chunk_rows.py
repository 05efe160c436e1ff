"""Rows per chunk of the fused linear losses (``ops/linear_chunks.py``): from free memory, and on
a GPU long enough for the chunk's weight-gradient GEMM to be compute-bound.
"""

from __future__ import annotations

import math
import os

import torch

# A chunk may take this share of free memory.
_FREE_SHARE = 4
# The arithmetic intensity (FLOP per byte) the dW GEMM of a chunk must reach on a GPU: twice
# the ridge point of the H100/H200 class (dense bf16 tensor-core FLOP/s over HBM bytes/s in the
# vendor's datasheets: about 300 and 200), so that the GEMM stays compute-bound with its float32
# accumulator read and written.
_DW_INTENSITY = 600
# A CUDA chunk of a head that no length makes compute-bound (narrow heads) stays within this.
_MAX_CHUNK_BYTES_CUDA = 1 << 30
# Off CUDA: a byte cap near the cache-friendly size of the torch row pass, and at most D / 2
# rows, so that a chunk's buffers stay within twice the weight gradient's size, as in torch's
# chunked linear_cross_entropy (it binds only for narrow heads; thinner chunks mean more
# per-sample groups, each paying the second stage).
_MAX_CHUNK_BYTES_OTHER = 128 << 20
_CPU_ROWS_PER_DIM = 0.5
_MIN_CHUNK_ROWS = 16
# Tensor-core GEMMs run best on row counts that are multiples of this.
_ROW_MULTIPLE = 64


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the CUDA allocator's view on GPUs, MemAvailable on the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def compute_bound_rows(vocab: int, dim: int, elem_size: int) -> int | None:
    """The fewest rows c at which the dW GEMM [V, c] x [c, D] reaches ``_DW_INTENSITY``: its
    2 c V D FLOPs over its bytes, e c (V + D) for G and the hidden chunk plus 8 V D for the
    float32 accumulator read and written. None when no c does (narrow heads: D below about
    ``_DW_INTENSITY * e / 2``, where the GEMM is bandwidth-bound at any length)."""
    slope = 2 * vocab * dim - _DW_INTENSITY * elem_size * (vocab + dim)
    if slope <= 0:
        return None
    return math.ceil(8 * _DW_INTENSITY * vocab * dim / slope)


def chunk_rows_for(
    n_rows: int, vocab: int, elem_size: int, device: torch.device, free: int | None = None, dim: int | None = None
) -> int:
    """Rows per chunk for ``n_rows`` rows over a vocabulary of ``vocab`` in ``elem_size``-byte
    logits and hidden size ``dim``; a row of a chunk costs ``2 * vocab * elem_size`` bytes (its
    logits, and a gradient buffer for the compiled row passes that cannot write in place).

    CUDA: up to twice ``compute_bound_rows`` (when ``dim`` is known and such rows exist; else
    up to ``_MAX_CHUNK_BYTES_CUDA``), within ``free / _FREE_SHARE``; balanced so that every
    chunk keeps about the compute-bound rows where memory allows. Elsewhere: within
    min(``_MAX_CHUNK_BYTES_OTHER``, free / ``_FREE_SHARE``) and at most ``dim / 2`` rows. Then a
    multiple of ``_ROW_MULTIPLE`` when more fit, at least ``_MIN_CHUNK_ROWS``, at most
    ``n_rows``, balanced so that the last chunk is not a sliver."""
    per_row = 2 * vocab * elem_size
    free = free_memory(device) if free is None else free
    if device.type == "cuda":
        rows = (free // _FREE_SHARE) // per_row
        target = None if dim is None else compute_bound_rows(vocab, dim, elem_size)
        rows = min(rows, _MAX_CHUNK_BYTES_CUDA // per_row if target is None else 2 * target)
    else:
        rows = min(_MAX_CHUNK_BYTES_OTHER, free // _FREE_SHARE) // per_row
        if dim is not None:
            rows = min(rows, int(dim * _CPU_ROWS_PER_DIM))
    rows = max(_MIN_CHUNK_ROWS, rows)
    if rows > _ROW_MULTIPLE:
        rows -= rows % _ROW_MULTIPLE
    rows = min(rows, n_rows)
    return math.ceil(n_rows / math.ceil(n_rows / rows))


def auto_chunk_rows(n_rows: int, weight: torch.Tensor) -> int:
    """The default rows per chunk of ``n_rows`` rows under the head ``weight`` [V, D]."""
    return chunk_rows_for(n_rows, weight.shape[0], weight.element_size(), weight.device, dim=weight.shape[1])
