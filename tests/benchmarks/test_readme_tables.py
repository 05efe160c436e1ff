"""The benchmark tables of docs/benchmarks.md and README.md's headline figures are the ones generated from the
committed results."""

from __future__ import annotations

import json
import re

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


def test_train_step_settings_get_their_own_sections(tmp_path):
    """A --setting paper result (train_step_paper_*.json also matches train_step_*.json) renders only
    in its own section, with the paper's figures and regime beside ours, and never replaces the
    full-fine-tuning table."""

    def write(name: str, date: str, setting: str | None) -> None:
        payload = {"device_slug": "cpu-x", "device_type": "cpu", "date": date, "results": []}
        (tmp_path / name).write_text(json.dumps(payload | ({"setting": setting} if setting else {})))

    write("train_step_cpu-x_2026-01-01.json", "2026-01-01T00:00:00", None)
    write("train_step_paper_cpu-x_2026-02-01.json", "2026-02-01T00:00:00", "paper")
    by_pattern = {section[1]: section for section in readme_tables.SECTIONS}
    (full, _, _, keep_full), (paper, pattern, _, keep_paper) = (
        by_pattern["train_step_*.json"],
        by_pattern["train_step_paper_*.json"],
    )
    assert "paper" not in full and "paper's setting" in paper
    found = readme_tables.newest_per_device("train_step_*.json", tmp_path, keep_full)
    assert [p.name for p, _ in found] == ["train_step_cpu-x_2026-01-01.json"]
    found = readme_tables.newest_per_device(pattern, tmp_path, keep_paper)
    assert [p.name for p, _ in found] == ["train_step_paper_cpu-x_2026-02-01.json"]

    payload = {
        "device": "AMD EPYC",
        "device_type": "cpu",
        "cpu_threads": 2,
        "models": [{"model": "smollm2-135m"}],
        "settings": {"dtype": "float32", "prompt_tokens": 300, "response_tokens": 300},
        "paper": {"reduction_vs_reft": {"time": 0.7827, "memory": 0.9224}, "regime": "Llama-3-8B, 8-bit"},
        "reductions": [
            {"model": "smollm2-135m", "ours": "nlft_kernels_lora", "against": "reft", "time": 0.5, "memory": 0.25},
            {
                "model": "smollm2-135m",
                "ours": "nlft_authors_style_lora",
                "against": "reft",
                "time": 0.1,
                "memory": -0.5,
            },
        ],
    }
    text = readme_tables.paper_setting_summary(payload)
    first, _, lines = text.partition("\n\n")
    # The paper's figures: one sentence of their own, naming their regime; no line of ours carries them.
    assert "78.27% less time and 92.24% less memory for NLFT than for ReFT, are for Llama-3-8B, 8-bit." in first
    assert "not directly comparable" in first and "smollm2-135m in float32" in first
    assert "78.27" not in lines and "92.24" not in lines
    assert lines.splitlines() == [
        "- smollm2-135m, method + kernels (NLFT with nlft_kernels against ReFT): nlft_kernels_lora against reft, "
        "uneven: NLFT's step against ReFT with its sampling: 50.0% less time per sample and 25.0% less peak memory",
        "- smollm2-135m, method (authors'-style NLFT against ReFT): nlft_authors_style_lora against reft, uneven: "
        "NLFT's step against ReFT with its sampling: 10.0% less time per sample and 50.0% more peak memory",
    ]


def test_summary_lines_show_the_spread():
    payload = {
        "reductions": [
            {
                "model": "m",
                "comparison": "kernels alone",
                "ours": "nlft_kernels",
                "against": "nlft_authors_style",
                "costs": "training step only",
                "time": 0.5,
                "time_range": [0.25, 0.625],
                "memory": 0.1,
            }
        ]
    }
    assert readme_tables.train_step_summary(payload) == (
        "- m, kernels alone (NLFT with nlft_kernels against the authors'-style NLFT): nlft_kernels against "
        "nlft_authors_style, training step only: 50.0% less time per sample (median; 25.0% to 62.5% between the "
        "extreme steps) and 10.0% less peak memory"
    )


def _train_step_sections(readme: str) -> dict[str, list[str]]:
    """docs/benchmarks.md's generated training-step sections: title -> their lines."""
    generated = readme.split(readme_tables.START, 1)[1].split(readme_tables.END, 1)[0]
    sections = {}
    for part in generated.split("\n### ")[1:]:
        title, _, body = part.partition("\n")
        if title.startswith("One training step"):
            sections[title] = body.splitlines()
    return sections


def test_readme_summary_lines_name_the_comparison_they_report():
    """Every summary line of the docs' training-step sections names its comparison (method,
    method + kernels or kernels alone, in words), the two rows it sets against each other and what
    their costs include; the paper's figures appear in no such line and no table row."""
    from benchmarks.bench_train_step import LABEL_WORDS

    docs = readme_tables.DOCS.read_text(encoding="utf-8")
    sections = _train_step_sections(docs)
    assert sections, "docs/benchmarks.md has no training-step section"
    pattern = re.compile(
        r"^- (?P<model>[\w.-]+), (?P<label>method|method \+ kernels|kernels alone) \((?P<words>[^)]*)\): "
        r"(?P<ours>\w+) against (?P<against>\w+), (?P<costs>.+?): "
        r"\d+\.\d% (less|more) time per sample.* and \d+\.\d% (less|more) peak memory$"
    )
    found = 0
    for title, lines in sections.items():
        for line in lines:
            if line.startswith("- "):
                match = pattern.match(line)
                assert match, f"summary line does not name its comparison ({title}): {line}"
                assert match["words"] == LABEL_WORDS[match["label"]]
                found += 1
            if line.startswith("|"):
                assert "78.27" not in line and "92.24" not in line, line
    assert found, "no summary line in the training-step sections"


def test_the_gpu_headline_renders_first_when_a_result_exists(tmp_path):
    """A gpu_headline_*.json (as benchmarks.gpu_suite writes it) renders in its own section, the first;
    without one there is no such section."""
    assert "The headline on a GPU" not in readme_tables.render(tmp_path)
    ours = {"case": "nlft_loss 3 views bf16 N=8192 V=128256 fwd+bwd", "bench_case": "nlft_kernels", "ms": 2.5}
    ours |= {"gbs": 4000.0, "fraction_of_copy": 0.9}
    liger = {"case": "3x Liger cross_entropy bf16 N=8192 V=128256 fwd+bwd on the base, fwd on 2 teachers"}
    liger |= {"bench_case": "liger_cross_entropy_x3", "ms": 5.0, "gbs": 2000.0, "fraction_of_copy": 0.45}
    payload = {
        "device": "NVIDIA H200",
        "device_type": "cuda",
        "device_slug": "nvidia-h200",
        "date": "2026-12-05T00:00:00+00:00",
        "command": "python -m benchmarks.bench_loss --n 8192 --vocab 128256",
        "copy_gbs": 4444.0,
        "copy_buffer_bytes": 2**30,
        "target_fraction_of_copy": 0.85,
        "rows": [ours, liger],
        "not_measured": [{"case": "3x torch.compile(F.cross_entropy)", "status": "skipped", "note": "no compiler"}],
    }
    (tmp_path / "gpu_headline_nvidia-h200_2026-12-05.json").write_text(json.dumps(payload))
    title, pattern, table, keep = readme_tables.SECTIONS[0]
    assert title.startswith("The headline on a GPU")
    ((path, found),) = readme_tables.newest_per_device(pattern, tmp_path, keep)
    assert path.name == "gpu_headline_nvidia-h200_2026-12-05.json" and found == payload
    text = table(found)
    assert "| nlft_loss 3 views bf16 N=8192 V=128256 fwd+bwd | 2.50 | 4000 | 90 | 1.00 |" in text
    assert f"| {liger['case']} | 5.00 | 2000 | 45 | 2.00 |" in text
    assert "Copy bandwidth 4444 GB/s" in text and "Not measured: 3x torch.compile(F.cross_entropy) (skipped" in text
    # README.md's headline line for it: the share of the copy bandwidth, the baselines' times as multiples.
    line = readme_tables.render_headline(tmp_path).splitlines()[0]
    assert line.startswith("- NVIDIA H200 (cuda), 2026-12-05: nlft_loss 3 views bf16 N=8192 V=128256 fwd+bwd: 2.50 ms")
    assert "90% of the same run's copy bandwidth (4444 GB/s); 3x Liger cross_entropy 2.00x its time" in line
    assert "([JSON](" in line


def test_headline_lines_link_their_results(tmp_path):
    """README.md's headline figures: one line per headline result, each linking its JSON from the
    README's folder, and the pointer to the full tables; links in docs/ go up one folder."""
    readme = readme_tables.README.read_text(encoding="utf-8")
    headline = readme.split(readme_tables.HEADLINE_START, 1)[1].split(readme_tables.HEADLINE_END, 1)[0]
    links = re.findall(r"\[JSON\]\(([^)]+)\)", headline)
    assert links, "README.md's headline names no result"
    for link in links:
        assert (readme_tables.README.parent / link).is_file(), link
    assert "(docs/benchmarks.md)" in headline
    docs = readme_tables.DOCS.read_text(encoding="utf-8")
    for link in re.findall(r"\]\((\.\./benchmarks/results/[^)]+)\)", docs):
        assert (readme_tables.DOCS.parent / link).is_file(), link
    assert readme_tables.render_headline(tmp_path).startswith("\nEvery table"), "no result, no headline line"
