"""What the AOT compile (``tests/ops/compile_kernels.py``) covers and what a compiled variant may
use: importable without Triton's compiler state, so that tests running under the interpreter
(``tests/ops/test_triton_compile.py``) read the same limits the script checks."""

import torch

VOCABS = (32000, 50257, 128256, 151936, 256000)
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
REGISTERS_PER_SM = 65536

# float64 (the gradcheck dtype) divides in IEEE double precision, whose slow path ptxas emits as a
# subroutine (CALL) in the row rule, between the sweeps: registers kept across the calls are saved
# in the call frame, stored once per program before the sweeps and loaded once after (none in a
# loop: checked). Seen in float64 forward-kernel variants with two or three views: one register
# (8 bytes) with Triton 3.6 and 3.8, two (16 bytes) in one T=1 three-view gradient variant with
# Triton 3.9. That is not register pressure; any other spill, and any spill of a 16/32-bit variant
# but the one below, is.
FP64_CALL_FRAME_BYTES = 16
# sm_80 only: ptxas settles some three-view variants at 80 registers (three 256-thread blocks an SM)
# and keeps one of the row's scalars in local memory across the sweep instead of a register: one
# store before the sweep, one load after it (seen with Triton 3.6: a 16-bit label logit of the
# no-gradient, T=1 variant), a few bytes a row against the row's hundreds of kilobytes. An
# occupancy choice, not register pressure; none in a loop (checked). sm_90 allows no such spill.
SM80_ROW_SPILL_BYTES = 8
# Block-wide barriers (``bar_sync_count``) allowed in an sm_90 variant: each is a wait of every
# warp on the slowest one. The row kernels keep their running statistics per thread and reduce
# across warps once per row (issue 21).
MAX_BAR_SYNC_SM90 = 8


def check(row: dict) -> list[str]:
    """What would make this variant fail or crawl on a GPU: spills, local memory, a block whose
    registers exceed one SM's."""
    problems = []
    spills = row["spill_store_bytes"] or row["spill_load_bytes"] or row["local_bytes"] or row["stack_bytes"]
    # The two named exceptions below: a few bytes, none of them touched inside a loop.
    outside_loops = row["local_bytes"] == 0 and row["local_accesses_in_loops"] == 0
    spilled = max(row["stack_bytes"], row["spill_store_bytes"], row["spill_load_bytes"])
    call_frame = "*fp64" in row["pointer_types"].values() and spilled <= FP64_CALL_FRAME_BYTES
    row_spill = row["arch"] == "sm_80" and spilled <= SM80_ROW_SPILL_BYTES
    if spills and not (outside_loops and (call_frame or row_spill)):
        problems.append("spills to local memory")
    if row["arch"] == "sm_90" and row["bar_sync"] > MAX_BAR_SYNC_SM90:
        problems.append(f"{row['bar_sync']} BAR.SYNC > {MAX_BAR_SYNC_SM90}")
    if row["registers_per_block"] > REGISTERS_PER_SM:
        problems.append(f"{row['registers']} registers x {row['threads']} threads > {REGISTERS_PER_SM}")
    return problems
