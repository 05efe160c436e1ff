"""benchmarks.tune_launch: its dry run times every candidate through the public API and
proposes a launch table that ops/launch.py accepts, leaving the live table as it was."""

import dataclasses
import json

import pytest
import torch

import nlft_kernels.ops.launch as launch
from benchmarks import tune_launch
from nlft_kernels.ops.launch import LaunchConfig
from tests.conftest import NEEDS_TRITON


@NEEDS_TRITON
def test_dry_run_measures_and_proposes_a_valid_table(tmp_path):
    before = dict(launch.TUNED)
    assert tune_launch.main(["--dry-run", "--out", str(tmp_path / "launch.json")]) == 0
    assert launch.TUNED == before, "the tuner must put the live table back"
    payload = json.loads((tmp_path / "launch.json").read_text())
    assert {(r["family"], r["streams"]) for r in payload["results"]} == {
        ("token_logprobs", 1),
        ("row_pass", 1),
        ("row_pass", 2),
        ("row_pass", 3),
    }
    # No GPU here: the CUDA row pass's key is reported as not run, with the reason.
    assert any(note.startswith("cuda_row_pass streams=3: ") for note in payload["not_run"]), payload["not_run"]
    assert payload["on_chip_vs_l2"] == []
    for row in payload["results"]:
        assert row["rule_ms"] is not None and len(row["candidates"]) > 1
        assert row["best_ms"] == min(c["ms"] for c in row["candidates"])
    namespace = {"LaunchConfig": LaunchConfig}
    exec(payload["proposed_tuned"], namespace)  # LaunchConfig validates each entry
    for key, cfg in namespace["TUNED"].items():
        family, bucket, streams, dtype = key
        assert family in launch.FAMILIES and bucket & (bucket - 1) == 0 and isinstance(cfg, LaunchConfig)
    assert (tmp_path / "launch.md").exists()


def test_candidates_cover_every_launch_option():
    """Each field of the launch configuration beyond BLOCK_V and num_warps is tuned: a boolean both ways
    (an eviction hint, say), any other at the rule's value unless values are given."""

    @dataclasses.dataclass(frozen=True)
    class WithOptions:
        block_v: int
        num_warps: int
        evict_hints: bool = True
        num_stages: int = 3

    rule = WithOptions(4096, 8)
    assert tune_launch.option_values(rule) == {"evict_hints": (False, True), "num_stages": (3,)}
    assert tune_launch.option_values(rule, {"num_stages": (1, 2)})["num_stages"] == (1, 2)
    plain = list(tune_launch.candidates(128256, 3, torch.bfloat16))
    assert plain and all(isinstance(c, LaunchConfig) for c in plain) and len(set(plain)) == len(plain)
    fields = {f.name for f in dataclasses.fields(LaunchConfig)} - {"block_v", "num_warps"}
    booleans = [f for f in fields if isinstance(getattr(plain[0], f), bool)]
    per_block_warps = {(c.block_v, c.num_warps) for c in plain}
    assert len(plain) == len(per_block_warps) * 2 ** len(booleans)  # every boolean option both ways


@NEEDS_TRITON
def test_keys_and_options_are_checked_and_kept(tmp_path):
    out = tmp_path / "launch.json"
    assert tune_launch.main(["--dry-run", "--keys", "row_pass:3", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {(r["family"], r["streams"]) for r in payload["results"]} == {("row_pass", 3)}
    (row,) = payload["results"]
    assert {"block_v", "num_warps"} <= set(row["rule"]) and set(row["best"]) == set(row["rule"])
    with pytest.raises(SystemExit):
        tune_launch.main(["--dry-run", "--keys", "row_pass:4"])
    with pytest.raises(SystemExit):
        tune_launch.main(["--dry-run", "--option", "no_such_option=1,2"])


def _row(family: str, candidates: list[dict], rule: dict) -> dict:
    ms = [c["ms"] for c in candidates]
    best = candidates[ms.index(min(ms))]
    fields = {k: v for k, v in best.items() if k != "ms"}
    rule_ms = next(c["ms"] for c in candidates if {k: v for k, v in c.items() if k != "ms"} == rule)
    return {"family": family, "vocab": 128256, "bucket": 131072, "streams": 3, "dtype": "bfloat16",
            "rule": rule, "rule_ms": rule_ms, "best": fields, "best_ms": min(ms), "candidates": candidates}  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_chip_vs_l2_names_the_fastest_way_and_proposes_it(seed):
    """The decision table of the base row's second read, from timed candidates (random times,
    seed printed): each way's best time, the on-chip cluster size, the fastest way; and the
    CUDA_TUNED literal proposes the on-chip clusters only when they beat one block per row."""
    g = torch.Generator().manual_seed(seed)
    print(f"seed={seed}")
    t = (torch.rand(8, generator=g) + 0.5).tolist()  # distinct: no ties
    rule = {"block_v": 2048, "num_warps": 8, "evict": True}
    triton = _row(
        "row_pass",
        [
            rule | {"ms": t[0]},
            rule | {"evict": False, "ms": t[1]},
            rule | {"num_warps": 4, "ms": t[2]},
            rule | {"num_warps": 4, "evict": False, "ms": t[3]},
        ],  # fmt: skip
        rule,
    )
    cuda = _row(
        "cuda_row_pass",
        [{"blocks_per_row": k, "ms": ms} for k, ms in zip((0, 2, 4, 8), t[4:], strict=True)],
        {"blocks_per_row": 0},
    ) | {"arch": "sm_90"}
    (d,) = tune_launch.on_chip_vs_l2([triton, cuda])
    assert d["triton_l2_hints_ms"] == min(t[0], t[2]) and d["triton_no_hints_ms"] == min(t[1], t[3])
    assert d["cuda_one_block_ms"] == t[4] and d["cuda_on_chip_ms"] == min(t[5:])
    assert d["on_chip_blocks"] == (2, 4, 8)[t[5:].index(min(t[5:]))]
    ways = {w: d[f"{w}_ms"] for w in ("triton_l2_hints", "triton_no_hints", "cuda_one_block", "cuda_on_chip")}
    assert d["fastest"] == min(ways, key=ways.get)
    namespace = {"LaunchConfig": LaunchConfig}
    exec(tune_launch.proposal([triton, cuda], min_gain=0.0), namespace)
    proposed = namespace["CUDA_TUNED"].get(("sm_90", 131072, 3, "bfloat16"))
    assert proposed == (d["on_chip_blocks"] if min(t[5:]) < t[4] else None)
    assert "CUDA, on chip (blocks)" in tune_launch.table([triton, cuda], [d])
