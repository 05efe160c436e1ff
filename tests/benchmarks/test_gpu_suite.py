"""benchmarks/gpu_suite.py: the plan fits the device's limits, the dry run writes every step's
outputs and bundles on the CPU, GPU_CHOICE follows the measurement, and --collect restores the
bundles."""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from benchmarks import _util, gpu_suite
from benchmarks.gpu_suite import BY_NAME, CALLS, STEPS

backends_module = importlib.import_module("nlft_kernels.backends")

STEP_NAMES = {"install", "tests", "cpu_kernel", "summary", "loss", "tune", "linear_loss", "train_step"}


def test_plan_lists_every_step_within_the_budgets():
    assert {s.name for s in STEPS} == STEP_NAMES
    assert all(0 < s.budget_s < 9 * 60 for s in STEPS), [(s.name, s.budget_s) for s in STEPS]
    assert sum(s.budget_s for s in STEPS) < 25 * 60
    # Every step runs in some run-tool call; each call fits one command's 10 minutes (install is
    # built in the first call and carried after it).
    assert {n for call in CALLS for n in call} == STEP_NAMES
    assert "summary" in CALLS[0]  # GPU_CHOICE comes back with the first call
    assert gpu_suite.CALL_DEADLINE_S < 600
    for i, call in enumerate(CALLS):
        assert call[0] == "install"
        assert gpu_suite.call_budget_s(call, cached_install=i > 0) <= gpu_suite.CALL_DEADLINE_S, call
    # A benchmark's own budget leaves its step time to write its results.
    assert all(s.margin_s < s.budget_s for s in STEPS)


def test_plan_prints_budgets_commands_and_run_tool_calls():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--plan"],
        cwd=gpu_suite.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    plan = done.stdout
    for step in STEPS:
        assert f"{step.budget_s / 60:.1f} m" in plan and step.what in plan
    for module in ("bench_loss", "tune_launch", "bench_linear_loss", "bench_cpu_kernel --gpu", "bench_train_step"):
        assert f"python3 -m benchmarks.{module}" in plan
    assert "pip wheel --no-deps --no-build-isolation --no-index" in plan and "tests/csrc/test_cuda_kernel.py" in plan
    for call in CALLS:
        assert f'run(command="{gpu_suite.run_tool_command(call)}", carry=["build/gpu_suite"], timeout_s=600)' in plan
    assert "--prepare" in plan and "--collect" in plan


def test_gpu_tests_are_the_marked_files():
    files = gpu_suite.gpu_test_files()
    assert "tests/csrc/test_cuda_kernel.py" in files
    # This module sets TRITON_INTERPRET=1 when imported: it must not be collected on the GPU.
    assert "tests/ops/test_nlft_linear_loss.py" not in files
    # gpu_too: Triton at real vocabularies, on CUDA tensors there (interpreted on the CPU elsewhere)
    assert "tests/ops/test_real_vocabularies.py" in files


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every step (about a minute on 2 cores), shared by the tests below."""
    work = tmp_path_factory.mktemp("gpu_suite")
    before = _suite_files()
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run", "--work-dir", str(work)],
        cwd=gpu_suite.REPO_ROOT,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(gpu_suite.REPO_ROOT)},
        timeout=600,
    )
    seconds = time.monotonic() - start
    return work, done, seconds, _suite_files() == before


def _suite_files() -> dict:
    """The files in benchmarks/results/ a dry run could have written there by mistake (others may
    write other results while the tests run)."""
    return {
        p.name: p.stat().st_mtime_ns
        for p in _util.RESULTS_DIR.iterdir()
        if "dry-run" in p.name or p.name.startswith(("gpu_tests_", "gpu_choice_", "gpu_suite_"))
    }


def test_dry_run_runs_every_step(dry_run):
    work, done, seconds, results_untouched = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert results_untouched, "the dry run wrote into benchmarks/results/"
    assert "Run-tool calls" in done.stdout  # the plan comes first
    records = {n: json.loads((work / "steps" / f"{n}.json").read_text()) for n in STEP_NAMES}
    assert {n: r["status"] for n, r in records.items()} == dict.fromkeys(STEP_NAMES, "ok")
    # What needs CUDA says so, and why.
    assert "skipped --gpu: needs CUDA" in done.stdout
    assert "GPU_CHOICE not proposed" in done.stdout
    tests = json.loads(next((work / "results").glob("gpu_tests_*.json")).read_text())
    assert tests["failed"] == 0 and tests["skipped"] > 0 and tests["passed"] == 0, tests
    print(f"dry run: {seconds:.0f} s")


def test_dry_run_writes_each_benchmarks_outputs(dry_run):
    work, done, _, _ = dry_run
    results = work / "results"
    for prefix, suffixes in (
        ("bench_loss-", (".json", ".md", ".png")),
        ("linear_loss_", (".json", ".md", ".png")),
        ("train_step_", (".json", ".md", ".png")),
        ("cpu_kernel_", (".json", ".md")),
        ("launch_", (".json", ".md")),
        ("gpu_choice_", (".json", ".md")),
        ("gpu_suite_", (".json", ".md")),
    ):
        (found,) = results.glob(f"{prefix}*.json")
        for suffix in suffixes:
            assert found.with_suffix(suffix).stat().st_size > 0, (found, suffix)
    loss = json.loads(next(results.glob("bench_loss-*.json")).read_text())
    ours = next(r for r in loss["cases"] if r["case"] == "nlft_kernels")
    assert ours["bytes_moved"] == _util.nlft_row_pass_bytes(ours["n"], ours["vocab"], 4, 2, 4)
    assert ours["achieved_bytes_per_s"] > 0 and ours["fraction_of_copy_bandwidth"] > 0
    suite = json.loads(next(results.glob("gpu_suite_*.json")).read_text())
    assert set(suite["steps"]) == STEP_NAMES - {"summary"} and suite["dry_run"]


def test_dry_run_bundles_fit_the_run_tool_and_collect_restores_them(dry_run, tmp_path):
    work, _, _, _ = dry_run
    bundles = sorted((work / "out").iterdir())
    assert [b.name for b in bundles] == sorted(f"{n}.tar.gz" for n in STEP_NAMES)
    assert len(bundles) <= gpu_suite.OUT_MAX_FILES
    assert all(b.stat().st_size <= gpu_suite.OUT_MAX_FILE_BYTES for b in bundles)
    written = gpu_suite.collect(work / "out", root=tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    loss_json = next((work / "results").glob("bench_loss-*.json"))
    assert f"benchmarks/results/{loss_json.name}" in names
    assert "build/gpu_suite/steps/loss.json" in names and "build/gpu_suite/device.json" in names
    assert (tmp_path / "benchmarks/results" / loss_json.name).read_bytes() == loss_json.read_bytes()


def test_collect_refuses_paths_outside_results_and_work(tmp_path):
    archive = tmp_path / "in" / "evil.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("../escape.txt", "nlft_kernels/backends.py", "benchmarks/results/ok.json"):
            data = b"{}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    root = tmp_path / "root"
    written = gpu_suite.collect(archive.parent, root=root)
    assert [p.relative_to(root).as_posix() for p in written] == ["benchmarks/results/ok.json"]
    assert not (tmp_path / "escape.txt").exists()


def _cpu_kernel_payload(ms: dict[tuple[int, int], tuple[float, float]]) -> dict:
    """bench_cpu_kernel --gpu rows: (N, V) -> (cuda ms, triton ms), the same in both dtypes."""
    rows = []
    for (n, vocab), (cuda, triton) in ms.items():
        for dtype in ("bfloat16", "float32"):
            shape = {"n": n, "vocab": vocab, "dtype": dtype}
            rows += [shape | {"case": "cuda", "median_ms": cuda}, shape | {"case": "triton", "median_ms": triton}]
            rows.append(shape | {"case": "cross_entropy", "median_ms": 1.0})
    return {"device_type": "cuda", "cases": rows}


def test_gpu_choice_sends_each_measured_shape_to_its_faster_kernel(monkeypatch):
    # CUDA wins at few rows; at 32000 also at 8192 rows; Triton wins the big shapes, and a 1%
    # CUDA lead (under the noise margin) stays with Triton.
    measured = {
        (1024, 32000): (1.0, 1.5),
        (8192, 32000): (5.0, 6.0),
        (1024, 128256): (2.0, 2.5),
        (8192, 128256): (9.9, 10.0),
    }
    choice = gpu_suite.propose_gpu_choice(_cpu_kernel_payload(measured))
    assert choice["proposal"] == [
        [gpu_suite.UNBOUNDED, 32000, "cuda"],
        [1024, gpu_suite.UNBOUNDED, "cuda"],
    ]
    monkeypatch.setattr(backends_module, "GPU_CHOICE", tuple(tuple(e) for e in choice["proposal"]))
    monkeypatch.setattr(backends_module, "_cuda_unavailable", lambda: None)
    for (n, vocab), (cuda, triton) in measured.items():
        want = "cuda" if cuda / triton < 1 - gpu_suite.CUDA_MARGIN else "triton"
        assert backends_module.gpu_choice(n, vocab) == want, (n, vocab)
    # Beyond the grid: the nearest measured point decides.
    assert backends_module.gpu_choice(100_000, 32000) == "cuda"
    assert backends_module.gpu_choice(100_000, 256000) == "triton"
    literal = choice["literal"]
    namespace: dict = {}
    exec(literal, namespace)  # the printed literal is valid Python with the same entries
    assert [list(e) for e in namespace["GPU_CHOICE"]] == choice["proposal"]


def test_gpu_choice_is_empty_when_triton_always_wins():
    choice = gpu_suite.propose_gpu_choice(_cpu_kernel_payload({(1024, 32000): (2.0, 1.0), (8192, 32000): (3.0, 3.0)}))
    assert choice["proposal"] == [] and choice["literal"].endswith("= ()")
    none = gpu_suite.propose_gpu_choice({"cases": [{"n": 1, "vocab": 2, "dtype": "float32", "case": "triton"}]})
    assert none["proposal"] is None and none["reason"]


def test_steps_that_need_cuda_are_skipped_without_it(tmp_path, capsys):
    ctx = gpu_suite.Context(False, tmp_path, tmp_path / "results", None, None, {"device_type": "cpu"})
    (result,) = gpu_suite.run_steps(["loss"], ctx)
    assert result.status == "skipped" and "needs CUDA" in result.notes[0]
    assert BY_NAME["loss"].needs_cuda and not BY_NAME["summary"].needs_cuda
