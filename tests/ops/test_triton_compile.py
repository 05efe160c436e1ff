"""Every Triton kernel variant the package launches compiles for sm_80 and sm_90 without spills and,
on sm_90, with at most ``MAX_BAR_SYNC_SM90`` block-wide barriers; the committed resource report
(benchmarks/results/aot_triton_kernels.json) holds one section per Triton version (the CI's and
the lent GPU machines'), each of every launched variant, and is that of the code as it is.

Compiling every variant takes long (about 690 launched x 2 targets), so CI compiles a
representative subset with the installed Triton (``SUBSET``: the headline bfloat16 vocabulary,
aligned, an unaligned one, and float64) and checks that its resources equal the committed ones;
the committed sections are checked in full, and the set of launched variants (recorded without
compiling) must be the committed one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from tests.ops import aot_limits

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "benchmarks" / "results" / "aot_triton_kernels.json"
# The Triton versions the report must hold: what `pip install torch` brings today (torch 2.15),
# CI's (its machine caps pip at torch 2.14.1) and the lent GPU machines' (torch 2.11).
REQUIRED_VERSIONS = ("3.9", "3.8", "3.6")
# Compiled in CI: (vocabularies, dtypes), each the cross product.
SUBSET = (("128256", "50257"), ("bfloat16",)), (("32000",), ("float64",))
KERNELS = {
    "_nlft_fwd_kernel",
    "_scale_rows_kernel",
    "_token_logprobs_kernel",
    "_token_logprobs_bwd_kernel",
    "_token_logprobs_grad_kernel",
    "_cluster_walk_kernel",
}
# Resources that must equal the committed ones where the Triton version is the same.
COMPARED = ("registers", "shared_bytes", "bar_sync", "spill_store_bytes", "spill_load_bytes", "stack_bytes")


def _key(row: dict) -> str:
    identity = {k: row[k] for k in ("kernel", "arch", "constexprs", "pointer_types", "divisible_by_16", "num_warps")}
    return json.dumps(identity, sort_keys=True)


def _compile_kernels(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run(
        [sys.executable, "-m", "tests.ops.compile_kernels", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def _sections() -> dict[str, dict]:
    return json.loads(COMMITTED.read_text())["triton_versions"]


def _installed_section() -> dict:
    section = _sections().get(triton.__version__)
    if section is None:
        pytest.skip(f"the report has no section of the installed Triton {triton.__version__}")
    return section


def test_committed_report_of_every_version_meets_the_limits():
    """Both required Triton versions, every vocabulary and dtype, no problem in any variant:
    <= 8 BAR.SYNC on sm_90, one block within an SM's registers, 0 spills (aot_limits.check)
    but for float64's division call frame and, on sm_80, one row scalar; both named below."""
    sections = _sections()
    for wanted in REQUIRED_VERSIONS:
        assert any(v == wanted or v.startswith(wanted + ".") for v in sections), f"no Triton {wanted} section"
    for version, section in sections.items():
        assert section["triton"] == version
        assert section["vocabularies"] == sorted(aot_limits.VOCABS)
        assert section["dtypes"] == [str(d).removeprefix("torch.") for d in aot_limits.DTYPES]
        rows = section["variants"]
        assert {r["arch"] for r in rows} == {"sm_80", "sm_90"} and {r["kernel"] for r in rows} == KERNELS
        for row in rows:
            assert row["problems"] == [] == aot_limits.check(row), (version, row)
            assert row["local_bytes"] == row["local_accesses_in_loops"] == 0, (version, row)
            spilled = row["spill_store_bytes"] or row["spill_load_bytes"] or row["stack_bytes"]
            if spilled:
                # The one exception, named: float64 (the gradcheck dtype) divides in IEEE double
                # precision, whose slow path ptxas emits as a subroutine; where ptxas keeps
                # registers across those calls it saves them once per program (at most 16 bytes,
                # stored before the sweeps, loaded once after) in the calls' frame. Not
                # register pressure: no local-memory access in any loop (asserted above).
                # The other, on sm_80 only: one row scalar kept in local memory across the sweep
                # at 80 registers (aot_limits.SM80_ROW_SPILL_BYTES).
                sm80 = row["arch"] == "sm_80"
                assert "*fp64" in row["pointer_types"].values() or sm80, (version, row)
                limit = aot_limits.SM80_ROW_SPILL_BYTES if sm80 else aot_limits.FP64_CALL_FRAME_BYTES
                assert max(row["stack_bytes"], row["spill_store_bytes"], row["spill_load_bytes"]) <= limit, row
            if row["arch"] == "sm_90":
                assert row["bar_sync"] <= aot_limits.MAX_BAR_SYNC_SM90, (version, row)


@pytest.mark.parametrize(
    "arch, pointer, spilled, in_loops, allowed",
    [
        ("sm_90", "*bf16", 4, 0, False),  # sm_90: no spill of a 16/32-bit variant
        ("sm_80", "*bf16", 4, 0, True),  # sm_80: one row scalar across the sweep
        ("sm_80", "*bf16", 4, 1, False),  # ... but never in a loop
        ("sm_80", "*bf16", 16, 0, False),  # ... and no more than one
        ("sm_90", "*fp64", 8, 0, True),  # float64's division call frame
        ("sm_90", "*fp64", 16, 1, False),  # ... never in a loop
        ("sm_90", "*fp64", 24, 0, False),  # ... and no more than two registers
    ],
)
def test_limits_tell_spills_apart(arch, pointer, spilled, in_loops, allowed):
    """aot_limits.check on made-up rows: which spills it lets through, and which it reports."""
    row = {
        "arch": arch, "pointer_types": {"base_ptr": pointer}, "local_bytes": 0, "local_accesses_in_loops": in_loops,
        "stack_bytes": 8, "spill_store_bytes": spilled, "spill_load_bytes": spilled, "bar_sync": 2,
        "registers": 80, "threads": 256, "registers_per_block": 80 * 256,
    }  # fmt: skip
    assert (aot_limits.check(row) == []) == allowed, aot_limits.check(row)


def test_committed_report_lists_every_launched_variant(tmp_path):
    """The variants the package launches now (recorded through the JIT, not compiled) are the
    committed ones of the installed Triton: the JIT's specialisation is part of a variant (aligned
    V=32000 and unaligned V=50257 rows give different ones)."""
    section = _installed_section()
    listed = tmp_path / "variants.json"
    run = _compile_kernels("--list", str(listed))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    launched = json.loads(listed.read_text())
    assert {_key(r) for r in section["variants"]} == {_key(r) for r in launched}, (
        "the launched variants changed: regenerate with python -m tests.ops.compile_kernels --write "
        f"{COMMITTED.relative_to(ROOT)} (under each Triton version of the report)"
    )
    aligned = {("base_sb" in r["divisible_by_16"]) for r in launched if r["kernel"] == "_nlft_fwd_kernel"}
    assert aligned == {True, False}


@pytest.mark.parametrize("vocabs, dtypes", SUBSET, ids=lambda v: "+".join(v))
def test_subset_compiles_as_committed(tmp_path, vocabs, dtypes):
    """A subset compiled with the installed Triton for sm_80 and sm_90: no problem (the limits
    hold with any Triton, one the report has no section of too), and the resources the committed
    section of this Triton states where it has one."""
    section = _sections().get(triton.__version__)
    report = tmp_path / "aot.json"
    args = [a for v in vocabs for a in ("--vocab", v)] + [a for d in dtypes for a in ("--dtype", d)]
    run = _compile_kernels(*args, "--write", str(report))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = json.loads(report.read_text())["triton_versions"][triton.__version__]["variants"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert [row for row in rows if row["problems"]] == []
    if section is None:
        pytest.skip(f"limits hold; the report has no section of the installed Triton {triton.__version__} to compare")
    committed = {_key(r): r for r in section["variants"]}
    for row in rows:
        assert _key(row) in committed, row
        assert {k: row[k] for k in COMPARED} == {k: committed[_key(row)][k] for k in COMPARED}, row
