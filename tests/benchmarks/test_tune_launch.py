"""benchmarks.tune_launch: its dry run times every candidate through the public API and
proposes a launch table that ops/launch.py accepts, leaving the live table as it was."""

import dataclasses
import json

import pytest
import torch

import nlft_kernels.ops.launch as launch
from benchmarks import tune_launch
from nlft_kernels.ops.launch import LaunchConfig


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
