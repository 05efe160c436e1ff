"""benchmarks.tune_launch: its dry run times every candidate through the public API and
proposes a launch table that ops/launch.py accepts, leaving the live table as it was."""

import json

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
