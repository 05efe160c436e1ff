"""benchmarks.gpu_suite: the plan fits one run-tool call (and says so when it does not), the dry run
runs every step on the CPU and writes $OUT as the GPU machine would, a second run skips what the
state file has, budgets are enforced, and --collect restores the files and the state."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks import _util, bench_loss
from benchmarks.gpu_suite import plan, runner, state, steps, wheels
from benchmarks.gpu_suite.plan import BY_NAME, STEPS, Estimate, PlannedStep

ROOT = plan.REPO_ROOT
STEP_NAMES = [s.name for s in STEPS]


def suite(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m benchmarks.gpu_suite ARGS`` as a real process from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )


# ---- The plan ------------------------------------------------------------------------------------


def test_the_call_fits_the_run_tool_and_the_lease():
    assert plan.MACHINE_START_S + plan.TRANSFER_S + plan.COMMAND_TIMEOUT_S == plan.CALL_WALL_S <= 9 * 60
    assert plan.COMMAND_TIMEOUT_S <= 600  # one command's limit
    assert plan.DEADLINE_S + plan.CLOSE_S == plan.COMMAND_TIMEOUT_S
    # One bundle per step and suite.json come back.
    assert len(STEPS) + 1 <= plan.OUT_MAX_FILES
    # The priority order of issue 21: (a) setup, build, tests; (b) headline; (c); (d); (e).
    assert [s.item for s in STEPS] == sorted(s.item for s in STEPS) and STEPS[0].name == "setup"
    assert plan.HARNESS_EXTRA_CALLS == _util.DO_BENCH_EXTRA_CALLS + 1


def test_the_plan_fits_one_call():
    """The sum of the steps' estimates (each from its grid through its stated model) stays within the
    time the command gives its steps; this test fails when a grid or a measurement pushes it over."""
    steps_planned = plan.planned()
    total = plan.total_s(steps_planned)
    assert total <= plan.DEADLINE_S, [(p.step.name, round(p.estimate.seconds)) for p in steps_planned]
    for p in steps_planned:
        assert p.estimate.seconds > 0 and p.estimate.model
        assert p.budget_s >= p.estimate.seconds + 30, p
    # The headline's bytes come from the package's traffic model (through bench_loss).
    assert plan.loss_bytes("nlft_kernels") == _util.nlft_row_pass_bytes(8192, 128256, 2, 2, 2)


def test_plan_prints_the_call_the_model_and_what_happens_on_failure():
    done = suite("--plan", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    call = 'run(command="PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_suite --run", carry=[".gpu_carry"], timeout_s='
    assert call + f"{plan.COMMAND_TIMEOUT_S})" in out
    assert "--prepare" in out and "--collect" in out and "fits" in out and "DOES NOT FIT" not in out
    for step in STEPS:
        assert f"| {step.item} | {step.name} |" in out and f"  {step.name}: " in out
    for name, lead in plan.LEADS.items():
        assert f"{name} = {lead.value:g}: {lead.source}" in out
    assert "`timeout`" in out and "`failed`" in out and "next step starts" in out


def test_the_docs_give_the_call_and_the_steps():
    docs = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert plan.run_call() in docs and "python -m benchmarks.gpu_suite --prepare" in docs
    for step in STEPS:
        assert f"| {step.item} | `{step.name}` | {step.what} |" in docs


def test_a_plan_over_the_budget_fails(tmp_path):
    """Steps measured slow on the plan's GPU replace the model; when they no longer fit, --plan
    says so and exits 1 (and so would --dry-run, which CI runs)."""
    slow = [
        state.Entry(name, "0" * 16, plan.PLAN_DEVICE, "ok", 100.0, "2026-12-01T00:00:00+00:00") for name in STEP_NAMES
    ]
    path = state.save(slow, tmp_path / "state.json")
    done = suite("--plan", "--state", str(path), timeout=300)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "DOES NOT FIT" in done.stdout and "(measured)" in done.stdout
    assert "measured on the GPU before: 100 s" in done.stdout


def test_a_step_stopped_by_its_budget_is_planned_longer():
    model = {p.step.name: p.estimate.seconds for p in plan.planned()}
    again = {
        p.step.name: p
        for p in plan.planned(lambda n: plan.Measured(100.0, n != "tune") if n in ("tune", "setup") else None)
    }
    assert again["setup"].estimate.seconds == pytest.approx(110) and again["setup"].measured
    assert (
        again["tune"].estimate.seconds == max(150, model["tune"])
        and "stopped by its budget" in again["tune"].estimate.model
    )
    assert again["headline"].estimate.seconds == model["headline"] and not again["headline"].measured


# ---- The dry run -----------------------------------------------------------------------------------


def _results_snapshot() -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in _util.RESULTS_DIR.iterdir()}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """Two dry runs into one folder (a few minutes on 2 cores): the first runs every step, the
    second finds them in its state file. The folder does not exist before: the suite makes it."""
    work = tmp_path_factory.mktemp("gpu_suite") / "work"
    before = _results_snapshot()
    first = suite("--dry-run", "--work-dir", str(work))
    first_out = work.parent / "first_out"
    shutil.copytree(work / "out", first_out)
    second = suite("--dry-run", "--work-dir", str(work))
    return work, first, second, first_out, _results_snapshot() == before


def test_dry_run_runs_every_step_and_touches_nothing_here(dry_run):
    work, first, _, out, untouched = dry_run
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-3000:]
    assert untouched, "the dry run wrote into benchmarks/results/"
    assert "| total |" in first.stdout and "Dry run on the CPU" in first.stdout
    records = {r["step"]: r for r in json.loads((out / "suite.json").read_text())["records"]}
    assert list(records) == STEP_NAMES
    status = {name: r["status"] for name, r in records.items()}
    assert status == dict.fromkeys(STEP_NAMES, "ok") | {"build": "skipped"}, status
    # Each step that ran left its bundle: its record, log and results, under the names --collect restores.
    for name in STEP_NAMES:
        if records[name]["status"] != "ok":
            continue
        with tarfile.open(out / f"{name}.tar.gz") as tar:
            members = set(tar.getnames())
        assert f"build/gpu_suite/steps/{name}.json" in members and f"build/gpu_suite/steps/{name}.log" in members
        assert set(records[name]["outputs"]) <= members
    assert len(list(out.iterdir())) <= plan.OUT_MAX_FILES
    assert all(p.stat().st_size <= plan.OUT_MAX_FILE_BYTES for p in out.iterdir())
    tests = json.loads(next((work / "results").glob("gpu_tests_*.json")).read_text())
    assert tests["failed"] == 0 and tests["skipped"] > 0 and tests["passed"] == 0, tests
    assert "-n 2" in tests["command"] and f"--timeout {plan.TESTS.timeout_s}" in tests["command"]


def test_a_second_run_skips_what_the_state_file_has(dry_run):
    work, _, second, _, _ = dry_run
    assert second.returncode == 0, second.stdout[-3000:]
    records = {r["step"]: r for r in json.loads((work / "out" / "suite.json").read_text())["records"]}
    recorded = [s.name for s in STEPS if s.recorded]
    assert {n: records[n]["status"] for n in recorded} == dict.fromkeys(recorded, "done_before")
    assert records["setup"]["status"] == "ok"  # always: it finds the GPU
    assert records["build"]["status"] == "skipped" and "only for tests" in records["build"]["notes"][0]
    entries = state.load(work / "state.json")
    assert {e.step for e in entries} == set(recorded) and {e.source_hash for e in entries} == {
        state.kernel_source_hash()
    }


def test_the_headline_file(dry_run):
    work, *_ = dry_run
    (path,) = (work / "results").glob("gpu_headline_*.json")
    head = json.loads(path.read_text())
    assert {"device", "copy_gbs", "rows"} <= set(head) and head["copy_gbs"] > 0
    (row,) = head["rows"]
    assert set(row) >= {"case", "ms", "gbs", "fraction_of_copy"}
    assert row["case"] == "nlft_loss 3 views fp32 N=64 V=1000 fwd+bwd"
    nbytes = bench_loss.bytes_moved("nlft_kernels", 64, 1000, "float32")
    assert row["bytes"] == nbytes == _util.nlft_row_pass_bytes(64, 1000, 4, 2, 4)
    assert row["gbs"] == pytest.approx(nbytes / (row["ms"] / 1e3) / 1e9)
    assert row["fraction_of_copy"] == pytest.approx(row["gbs"] / head["copy_gbs"])
    (liger,) = head["not_measured"]
    assert liger["case"].startswith("3x Liger cross_entropy") and liger["status"] == "skipped" and liger["note"]


def test_collect_restores_the_files_and_updates_the_state(dry_run, tmp_path):
    _, _, _, out, _ = dry_run
    returned = tmp_path / "returned"
    shutil.copytree(out, returned)
    # As a GPU run's: --collect leaves a dry run's records out of the state file.
    suite_json = json.loads((returned / "suite.json").read_text())
    (returned / "suite.json").write_text(json.dumps(suite_json | {"dry_run": False}))
    root = tmp_path / "root"
    written = runner.collect(returned, root=root)
    names = {p.relative_to(root).as_posix() for p in written}
    headline_json = next(n for n in names if n.startswith("benchmarks/results/gpu_headline_"))
    assert "build/gpu_suite/steps/headline.json" in names
    assert (root / headline_json).read_bytes() == tarfile.open(returned / "headline.tar.gz").extractfile(
        headline_json
    ).read()
    entries = state.load(root / "benchmarks/results/gpu_suite_state.json")
    assert sorted(e.step for e in entries) == sorted(s.name for s in STEPS if s.recorded)


def test_collect_refuses_paths_outside_results_and_work(tmp_path):
    archive = tmp_path / "in" / "evil.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("../escape.txt", "nlft_kernels/backends.py", "benchmarks/results/ok.json"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    root = tmp_path / "root"
    written = runner.collect(archive.parent, root=root)
    assert [p.relative_to(root).as_posix() for p in written] == ["benchmarks/results/ok.json"]
    assert not (tmp_path / "escape.txt").exists()


# ---- Budgets and failures ---------------------------------------------------------------------------


def _context(tmp_path: Path, deadline_s: float = 1e9) -> runner.Context:
    ctx = runner.Context(False, tmp_path / "work", tmp_path / "results", tmp_path / "out", tmp_path / "state.json")
    ctx.deadline_s = deadline_s
    return ctx


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "\nState:\tZ" in status.read_text()


def test_a_step_past_its_budget_is_stopped_with_its_children(tmp_path):
    ctx = _context(tmp_path)
    pids = tmp_path / "pids"
    code = (
        "import os, subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}'); time.sleep(60)"
    )

    def slow(ctx, budget, record):
        steps._run(ctx, record, [sys.executable, "-c", code], budget)

    start = time.monotonic()
    record = runner.run_step(ctx, PlannedStep(BY_NAME["tune"], Estimate(1, "test"), False, 3), slow)
    assert record.status == "timeout" and record.seconds < 20 and time.monotonic() - start < 30
    assert "killed after its budget of 3 s" in ctx.log("tune").read_text()
    deadline = time.monotonic() + 10
    while not all(_gone(int(pid)) for pid in pids.read_text().split()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(int(pid)) for pid in pids.read_text().split()), "a child outlived its step's budget"


def test_a_failed_step_is_recorded_and_the_others_run(tmp_path):
    ctx = _context(tmp_path)

    def setup(ctx, budget, record):
        ctx.device = {"device": "Test GPU", "device_type": "cuda", "device_slug": "test-gpu"}

    def broken(ctx, budget, record):
        raise RuntimeError("the kernel did not compile")

    def exits_1(ctx, budget, record):
        steps._run(ctx, record, [sys.executable, "-c", "raise SystemExit(1)"], budget)

    functions = dict.fromkeys(STEP_NAMES, lambda ctx, budget, record: None)
    functions |= {"setup": setup, "headline": broken, "linear_loss": exits_1}
    records = {r.step: r for r in runner.run_plan(ctx, functions)}
    assert records["headline"].status == "failed" and "did not compile" in records["headline"].notes[0]
    assert records["linear_loss"].status == "failed"
    assert records["train_step"].status == "ok" and records["tune"].status == "ok"
    suite_json = json.loads((ctx.out / "suite.json").read_text())
    assert [r["status"] for r in suite_json["records"]] == [records[n].status for n in STEP_NAMES]
    # Failed steps are not done: the next run repeats them; the ok ones it skips.
    entries = state.load(ctx.state_path)
    assert not state.done(entries, "headline", ctx.source_hash, "Test GPU")
    assert state.done(entries, "tune", ctx.source_hash, "Test GPU")
    again = {r.step: r.status for r in runner.run_plan(ctx, functions)}
    assert again["headline"] == "failed" and again["tune"] == "done_before"


def test_a_chosen_step_brings_what_it_needs(tmp_path):
    ctx = _context(tmp_path)

    def setup(ctx, budget, record):
        ctx.device = {"device": "Test GPU", "device_type": "cuda", "device_slug": "test-gpu"}

    functions = dict.fromkeys(STEP_NAMES, lambda ctx, budget, record: None) | {"setup": setup}
    assert [r.step for r in runner.run_plan(ctx, functions, ["tests"])] == ["setup", "build", "tests"]
    assert [r.step for r in runner.run_plan(ctx, functions, ["tune"])] == ["setup", "tune"]
    # tests is done now: its build does not run either.
    again = {r.step: (r.status, r.notes) for r in runner.run_plan(ctx, functions, ["tests"])}
    assert again["tests"][0] == "done_before" and again["build"] == ("skipped", ["only for tests, which does not run"])


def test_a_step_without_time_left_does_not_start(tmp_path):
    ctx = _context(tmp_path, deadline_s=0)
    record = runner.run_step(ctx, plan.planned()[-1], lambda ctx, budget, record: None)
    assert record.status == "not_started" and "the next call starts here" in record.notes[0]


def test_without_cuda_the_steps_are_skipped_with_the_reason(tmp_path):
    ctx = _context(tmp_path)

    def setup(ctx, budget, record):
        ctx.device = {"device": "AMD EPYC", "device_type": "cpu", "device_slug": "cpu"}

    records = runner.run_plan(ctx, dict.fromkeys(STEP_NAMES, setup))
    assert [r.status for r in records] == ["ok"] + ["skipped"] * (len(STEPS) - 1)
    assert "no CUDA device" in records[1].notes[0]


# ---- The state file -------------------------------------------------------------------------------------


def test_the_kernel_source_hash_follows_the_kernel_sources_only(tmp_path):
    for name, text in (("nlft_kernels/ops/a.py", "x = 1"), ("csrc/cuda/k.cu", "// k"), ("README.md", "r")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    first = state.kernel_source_hash(tmp_path)
    (tmp_path / "README.md").write_text("another readme")
    assert state.kernel_source_hash(tmp_path) == first
    for name in ("nlft_kernels/ops/a.py", "csrc/cuda/k.cu"):
        before = state.kernel_source_hash(tmp_path)
        (tmp_path / name).write_text((tmp_path / name).read_text() + "\n")
        assert state.kernel_source_hash(tmp_path) != before, name


def test_the_committed_state_file_reads():
    entries = state.load()
    assert all(e.step in BY_NAME and BY_NAME[e.step].recorded for e in entries)


# ---- The carried wheels -----------------------------------------------------------------------------------


def _wheel(path: Path, requires: list[str], python: str = ">=3.10") -> Path:
    meta = "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n" + f"Requires-Python: {python}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    libs = ["demo/libdemo_cuda118.so", "demo/libdemo_cuda130.so", "demo/libdemo_cpu.so", "demo/__init__.py"]
    with zipfile.ZipFile(path, "w") as z:
        for name in libs:
            z.writestr(name, b"\0" * 64)
        z.writestr("demo-1.0.dist-info/METADATA", meta)
        z.writestr("demo-1.0.dist-info/RECORD", "".join(f"{n},sha256=x,64\n" for n in libs))
    return path


def test_a_wheel_is_cut_down_to_the_native_library_the_machine_loads(tmp_path):
    path = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", [])
    removed = wheels.keep_native(path, ("libdemo_cuda130.so", "libdemo_cpu.so"))
    assert removed == ["demo/libdemo_cuda118.so"]
    with zipfile.ZipFile(path) as z:
        assert "demo/libdemo_cuda118.so" not in z.namelist() and "demo/libdemo_cuda130.so" in z.namelist()
        assert "libdemo_cuda118" not in z.read("demo-1.0.dist-info/RECORD").decode()
    assert wheels.bnb_library() == "libbitsandbytes_cuda130.so"  # torch 2.11.0+cu130 there


def test_requirements_are_checked_against_the_machine(tmp_path):
    ok = _wheel(tmp_path / "ok.whl", ["torch>=2.1.2", "triton>=2.3.1", "pytest>=7", "execnet>=2.1", "x; extra == 'y'"])
    assert wheels.check_requirements(ok) == []
    bad = _wheel(tmp_path / "bad.whl", ["triton>=3.7", "nowhere-package"], python=">=3.13")
    problems = wheels.check_requirements(bad)
    assert len(problems) == 3, problems
    assert any("triton 3.6.0" in p for p in problems) and any("not carried" in p for p in problems)
    assert any("3.12.3" in p for p in problems)


def test_what_travels_fits():
    carried = wheels.folder_bytes(ROOT / plan.CARRY_DIR) if (ROOT / plan.CARRY_DIR).exists() else 0
    assert wheels.tree_bytes() + carried <= plan.TREE_MAX_BYTES
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{plan.CARRY_DIR}/wheels/x.whl"], cwd=ROOT)
    assert ignored.returncode == 0, f"{plan.CARRY_DIR}/ must be ignored: the run call carries it"


@pytest.mark.skipif(
    not (ROOT / plan.CARRY_DIR / "manifest.json").exists(),
    reason="no .gpu_carry/ (python -m benchmarks.gpu_suite --prepare)",
)
def test_the_prepared_wheels_install_offline_and_work():
    manifest = json.loads((ROOT / plan.CARRY_DIR / "manifest.json").read_text())
    assert {w["name"] for w in manifest["wheels"]} == {w.name for w in wheels.WHEELS}
    assert all(w["problems"] == [] for w in manifest["wheels"]), manifest["wheels"]
    output = wheels.check_install()
    assert "cut-cross-entropy torch_compile" in output and "Linear8bitLt" in output
