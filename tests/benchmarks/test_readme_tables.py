"""The README's benchmark tables are the ones generated from the committed results."""

from __future__ import annotations

import json

import pytest

from benchmarks import _util, readme_tables


def test_readme_matches_the_results():
    assert readme_tables.main(["--check"]) == 0, "run: python -m benchmarks.readme_tables"


def test_newest_result_per_device_and_skipped_cases(tmp_path):
    def write(name: str, slug: str, date: str, ms: float, liger: str = "skipped") -> None:
        shape = {"n": 8, "vocab": 10, "dtype": "float32"}
        cases = [shape | {"case": "nlft_kernels", "status": "ok", "median_ms": ms, "peak_extra_bytes": 2**20}]
        cases.append(shape | {"case": "cross_entropy", "status": "ok", "median_ms": 2 * ms, "peak_extra_bytes": 2**21})
        cases.append(shape | {"case": "liger_cross_entropy_x3", "status": liger, "note": "needs CUDA"})
        payload = {
            "device": slug.upper(),
            "device_type": "cpu",
            "device_slug": slug,
            "date": date,
            "command": "python -m benchmarks.bench_loss --quick",
            "cases": cases,
        }
        (tmp_path / name).write_text(json.dumps(payload))

    write("bench_loss-a-old.json", "a", "2026-01-01T00:00:00", 5.0)
    write("bench_loss-a-new.json", "a", "2026-02-01T00:00:00", 4.0)
    write("bench_loss-b.json", "b", "2026-01-15T00:00:00", 3.0)
    found = readme_tables.newest_per_device("bench_loss-*.json", tmp_path)
    assert [(p.name, d["device_slug"]) for p, d in found] == [
        ("bench_loss-a-new.json", "a"),
        ("bench_loss-b.json", "b"),
    ]
    table = readme_tables.loss_table(found[0][1])
    # Results without the copy measurement (as old ones) render; GB/s comes from the bytes model.
    gbs = _util.nlft_row_pass_bytes(8, 10, 4, 2, 4) / 4e-3 / 1e9
    assert f"| 8 | 10 | float32 | 4.0 | {gbs:.1f} | - | 1 | 2.00x, 2.0x |" in table
    assert "liger" not in table  # a case that ran nowhere gets no column
    payload = found[0][1] | {"copy_bandwidth_bytes_per_s": gbs * 1e9 * 4}
    assert f"| 8 | 10 | float32 | 4.0 | {gbs:.1f} | 25 | 1 | 2.00x, 2.0x |" in readme_tables.loss_table(payload)


def test_rewrite_needs_the_markers():
    text = f"intro\n{readme_tables.START}\nold\n{readme_tables.END}\nrest\n"
    assert readme_tables.rewrite(text, "new") == f"intro\n{readme_tables.START}\nnew\n{readme_tables.END}\nrest\n"
    with pytest.raises(ValueError, match="markers"):
        readme_tables.rewrite("no markers", "new")
