"""Every Triton kernel variant the package launches compiles for sm_80 and sm_90 without spills,
and the committed resource report (benchmarks/results/aot_triton_kernels.json) is that of the
code as it is: the same variants, and the same registers where the Triton version is the same."""

import json
import os
import subprocess
import sys
from pathlib import Path

import triton

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "benchmarks" / "results" / "aot_triton_kernels.json"


def _key(row: dict) -> str:
    identity = {k: row[k] for k in ("kernel", "arch", "constexprs", "pointer_types", "divisible_by_16", "num_warps")}
    return json.dumps(identity, sort_keys=True)


def test_launched_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    report = tmp_path / "aot.json"
    run = subprocess.run(
        [sys.executable, "-m", "tests.ops.compile_kernels", "--write", str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    fresh = json.loads(report.read_text())
    rows = fresh["variants"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["kernel"] for r in rows} == {
        "_nlft_fwd_kernel",
        "_scale_rows_kernel",
        "_token_logprobs_kernel",
        "_token_logprobs_bwd_kernel",
        "_cluster_walk_kernel",
    }
    # The JIT's specialisation is part of what is compiled: aligned (V=32000) and unaligned
    # (V=50257) rows give different variants.
    aligned = {("base_sb" in r["divisible_by_16"]) for r in rows if r["kernel"] == "_nlft_fwd_kernel"}
    assert aligned == {True, False}
    for row in rows:
        assert row["problems"] == [], row
        assert row["registers"] * row["threads"] <= 65536, row
        if "*fp64" not in row["pointer_types"].values():  # float64 may keep a call frame (compile_kernels)
            assert row["spill_store_bytes"] == row["spill_load_bytes"] == row["local_bytes"] == 0, row
            assert row["stack_bytes"] == 0, row

    committed = json.loads(COMMITTED.read_text())
    assert {_key(r) for r in committed["variants"]} == {_key(r) for r in rows}, (
        "the launched variants changed: regenerate with python -m tests.ops.compile_kernels --write "
        f"{COMMITTED.relative_to(ROOT)}"
    )
    if committed["triton"] == triton.__version__:
        ours = {_key(r): (r["registers"], r["shared_bytes"]) for r in rows}
        assert {_key(r): (r["registers"], r["shared_bytes"]) for r in committed["variants"]} == ours
