"""The steps, each a function of (context, budget in seconds, record) that runs its commands under
the budget and fills the record: status, commands, outputs (names relative to the repository
root, as --collect restores them), notes and details. The benchmarks run through their own
entry points (bench_loss, bench_linear_loss, bench_train_step, tune_launch) on the plan's grids;
a dry run (``--dry-run``, on the CPU) runs each on a tiny grid into a temporary folder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.gpu_suite import headline, wheels
from benchmarks.gpu_suite.plan import CARRY_DIR, LINEAR, LOSS, REPO_ROOT, TESTS, TRAIN, TUNE, gpu_test_files
from benchmarks.gpu_suite.runner import Context, StepFunction, StepRecord, arcname, run_logged

PY = sys.executable
# Seconds a benchmark keeps, inside its step's budget, after its own --time-budget-s: for the case
# in progress when that budget runs out (the compiled one compiles for ~45 s; one train-step method
# runs ~50 s) and for writing its results.
BENCH_MARGIN_S = {"headline": 60, "linear_loss": 30, "train_step": 60, "tune": 10}


def _today() -> str:
    return dt.date.today().isoformat()


def _slug(ctx: Context) -> str:
    return ctx.device.get("device_slug", "unknown")


def _outputs(ctx: Context, *paths: Path) -> list[str]:
    """The arcnames of ``paths`` and their .md/.png siblings that exist."""
    found = []
    for path in paths:
        for p in (path, path.with_suffix(".md"), path.with_suffix(".png")):
            if p.exists() and arcname(ctx, p) not in found:
                found.append(arcname(ctx, p))
    return found


def _run(ctx: Context, record: StepRecord, argv: list[str], budget: float, env: dict | None = None) -> int:
    """Run ``argv`` for ``record`` under ``budget``; a timeout or a non-zero exit sets its status."""
    record.commands.append(shlex.join(argv))
    code, timed_out = run_logged(argv, ctx.log(record.step), budget, ctx, env)
    if timed_out:
        record.status = "timeout"
    elif code != 0:
        record.status = "failed"
    return code


def _time_budget(step: str, budget: float) -> list[str]:
    return ["--time-budget-s", f"{max(budget - BENCH_MARGIN_S[step], 1):.0f}"]


# ---- (a) setup, build, tests --------------------------------------------------------------------


def setup(ctx: Context, budget: float, record: StepRecord) -> None:
    """Install the carried wheels whose module does not import here (into ``wheels.SITE``, on the
    children's PYTHONPATH), then probe the device in a fresh interpreter."""
    carry = REPO_ROOT / CARRY_DIR
    if not (carry / "manifest.json").exists():
        record.notes.append(
            f"no {CARRY_DIR}/ (python -m benchmarks.gpu_suite --prepare, then carry it): the Liger, Cut "
            "Cross-Entropy and 8-bit cases are skipped, the train step uses byte tokens"
        )
    elif ctx.dry_run:
        record.notes.append(f"dry run: {CARRY_DIR}/'s wheels are not installed here (--prepare --check tries them)")
    else:
        todo = wheels.missing(carry)
        record.details["wheels_installed"] = [w.requirement for w, _ in todo]
        if todo and _run(ctx, record, wheels.install_command([f for _, f in todo], wheels.SITE), budget / 2) == 0:
            ctx.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(wheels.SITE), os.environ.get("PYTHONPATH")) if p)
    path = ctx.work / "device.json"
    if _run(ctx, record, [PY, "-m", "benchmarks.gpu_suite.probe", str(path)], budget / 2) == 0:
        ctx.device = json.loads(path.read_text())
        record.details["device"] = ctx.device
        record.device = ctx.device["device"]


def build(ctx: Context, budget: float, record: StepRecord) -> None:
    """``setup.py build_ext --inplace`` with the CUDA kernel required and built for this GPU's
    architecture only, then the backends as a fresh interpreter sees them."""
    argv = [PY, "setup.py", "build_ext", "--inplace"]
    if ctx.dry_run:
        record.status = "skipped"
        record.commands.append(
            "NLFT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=<this GPU's> MAX_JOBS=<cores> " + shlex.join(argv)
        )
        record.notes.append(
            "dry run: not built here (the checkout's build is used; tests/test_setup.py tests setup.py)"
        )
        return
    arch = ctx.device.get("gpu", {}).get("capability", "9.0")
    env = {"NLFT_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4)}
    if _run(ctx, record, argv, budget - 20, env) != 0:
        return
    path = ctx.work / "device-built.json"
    if _run(ctx, record, [PY, "-m", "benchmarks.gpu_suite.probe", str(path)], 20) == 0:
        built = json.loads(path.read_text())
        record.details["backends"] = built["backends"]
        ctx.device["backends"] = built["backends"]
        if not built["backends"]["cuda"].startswith("available"):
            record.status = "failed"
            record.notes.append(f"the CUDA kernel does not load: {built['backends']['cuda']}")


def tests(ctx: Context, budget: float, record: StepRecord) -> None:
    """The tests marked gpu or gpu_too (dry: the gpu ones, which skip on the CPU) under pytest-xdist,
    each stopped after TESTS.timeout_s; counts, failures and skip reasons to gpu_tests_*.json."""
    files = gpu_test_files()
    junit = ctx.steps_dir / "tests-junit.xml"
    marks = "gpu" if ctx.dry_run else TESTS.marks
    workers = 2 if ctx.dry_run else min(TESTS.workers, os.cpu_count() or 1)
    env = {"TRITON_INTERPRET": "0"} if not ctx.dry_run else {}
    if not ctx.dry_run:
        built = ctx.device.get("backends", {}).get("cuda", "").startswith("available")
        # Fail, not skip, where the build is missing, unless the build step failed (then say so).
        env["NLFT_REQUIRE_EXTENSION"] = "1" if built else "0"
        if not built:
            record.notes.append("the extension did not build: its tests skip, with the reason")
    argv = [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-n", str(workers)]
    argv += ["--timeout", str(TESTS.timeout_s), "-m", marks, f"--junitxml={junit}", *files]
    code = _run(ctx, record, argv, budget - 5, env)
    if record.status == "failed" and code == 5:  # nothing collected is no failure
        record.status = "ok"
    counts = junit_counts(junit) if junit.exists() else {}
    record.details |= {"files": files, "returncode": code} | {k: v for k, v in counts.items() if k != "skips"}
    payload = {
        "benchmark": "gpu_tests",
        "device": ctx.device.get("device"),
        "device_type": ctx.device.get("device_type"),
        "device_slug": _slug(ctx),
        "versions": ctx.device.get("versions"),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python3", *argv[1:]]).replace(str(junit), "<junit>"),
        "status": record.status,
        **counts,
    }
    path = ctx.results / f"gpu_tests_{_slug(ctx)}_{_today()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    path.with_suffix(".md").write_text(tests_table(payload) + "\n")
    record.outputs += _outputs(ctx, path)


def junit_counts(path: Path) -> dict:
    """Passed / failed / skipped counts of a pytest junit XML, with each failure and skip reason."""
    root = ET.parse(path).getroot()
    counts: dict = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            counts["failures"].append({"test": name, "message": (bad.get("message") or "")[:300]})
        elif (skipped := case.find("skipped")) is not None:
            counts["skipped"] += 1
            counts["skips"].append({"test": name, "reason": (skipped.get("message") or "")[:200]})
        else:
            counts["passed"] += 1
    return counts


def tests_table(payload: dict) -> str:
    lines = [
        f"GPU tests on {payload['device']} ({payload['device_type']}): {payload.get('passed', 0)} passed, "
        f"{payload.get('failed', 0)} failed, {payload.get('skipped', 0)} skipped ({payload['status']})",
        f"Command: `{payload['command']}`",
    ]
    lines += [f"- FAILED {f['test']}: {f['message']}" for f in payload.get("failures", [])]
    lines += [f"- skipped: {reason}" for reason in sorted({s["reason"] for s in payload.get("skips", [])})]
    return "\n".join(lines)


# ---- (b) to (e): the benchmarks -----------------------------------------------------------------


def headline_step(ctx: Context, budget: float, record: StepRecord) -> None:
    """bench_loss at the headline shape (the copy bandwidth first, in the same run), then
    gpu_headline_<device>_<date>.json from its result."""
    out = ctx.results / f"bench_loss-{_slug(ctx)}-{_today()}.json"
    if ctx.dry_run:
        grid = ["--n", "64", "--vocab", "1000", "--dtype", "float32", "--rows-per-sample", "16", "--in-process"]
        grid += ["--cases", "nlft_kernels", "liger_cross_entropy_x3", "--warmup", "1", "--reps", "2"]
    else:
        g = LOSS
        grid = [
            "--n",
            str(g.n),
            "--vocab",
            str(g.vocab),
            "--dtype",
            g.dtype,
            "--rows-per-sample",
            str(g.rows_per_sample),
        ]
        grid += ["--cases", *g.cases, "--warmup", str(g.warmup), "--reps", str(g.reps)]
    argv = [PY, "-m", "benchmarks.bench_loss", *grid, *_time_budget("headline", budget), "--no-plot", "--out", str(out)]
    _run(ctx, record, argv, budget)
    record.outputs += _outputs(ctx, out)
    if not out.exists():
        return
    head = headline.headline(json.loads(out.read_text()), out.name)
    path = ctx.results / f"gpu_headline_{_slug(ctx)}_{_today()}.json"
    path.write_text(json.dumps(head, indent=2) + "\n")
    text = headline.table(head)
    path.with_suffix(".md").write_text(f"{head['device']}, {head['date'][:10]}: `{head['command']}`\n\n{text}\n")
    record.outputs += _outputs(ctx, path)
    record.details["headline"] = {r["case"]: round(r["fraction_of_copy"], 3) for r in head["rows"]}
    print(text, flush=True)


def linear_loss(ctx: Context, budget: float, record: StepRecord) -> None:
    out = ctx.results / f"linear_loss_{_slug(ctx)}_{_today()}.json"
    g = LINEAR
    if ctx.dry_run:
        grid = ["--tiny", "--warmup", "0", "--reps", "1", "--cases", *g.cases]
    else:
        grid = ["--n", str(g.n), "--dim", str(g.dim), "--vocab", str(g.vocab), "--dtype", g.dtype, "--cases", *g.cases]
        grid += ["--warmup", str(g.warmup), "--reps", str(g.reps)]
    argv = [PY, "-m", "benchmarks.bench_linear_loss", *grid, *_time_budget("linear_loss", budget), "--out", str(out)]
    _run(ctx, record, [*argv, "--no-plot"], budget)
    record.outputs += _outputs(ctx, out)


def train_step(ctx: Context, budget: float, record: StepRecord) -> None:
    out = ctx.results / f"train_step_paper_{_slug(ctx)}_{_today()}.json"
    g = TRAIN
    argv = [PY, "-m", "benchmarks.bench_train_step", "--setting", "paper", "--base-weights", g.base_weights]
    argv += ["--methods", *g.methods]
    if ctx.dry_run:
        argv += ["--tiny", "--in-process"]
    else:
        tokenizer = REPO_ROOT / CARRY_DIR / "tokenizer"
        argv += ["--tokenizer", str(tokenizer) if tokenizer.is_dir() else "bytes"]
        argv += ["--warmup", str(g.warmup), "--reps", str(g.reps)]
        if not tokenizer.is_dir():
            record.notes.append(f"no SmolLM2 tokenizer in {CARRY_DIR}/ (--prepare): byte tokens")
    argv += [*_time_budget("train_step", budget), "--out", str(out)]
    _run(ctx, record, argv, budget)
    record.outputs += _outputs(ctx, out)
    if out.exists():
        rows = json.loads(out.read_text())["results"]
        record.details["rows"] = {r["method"]: r["status"] for r in rows}


def tune(ctx: Context, budget: float, record: StepRecord) -> None:
    out = ctx.results / f"launch_{_slug(ctx)}_{_today()}.json"
    g = TUNE
    argv = [PY, "-m", "benchmarks.tune_launch", "--keys", *g.keys]
    if ctx.dry_run:
        argv += ["--dry-run"]
    else:
        argv += ["--vocabs", *map(str, g.vocabs), "--dtypes", *g.dtypes, "--rows", str(g.rows)]
        argv += ["--warmup", str(g.warmup), "--reps", str(g.reps)]
    _run(ctx, record, [*argv, *_time_budget("tune", budget), "--out", str(out)], budget)
    record.outputs += _outputs(ctx, out)
    if out.exists():
        payload = json.loads(out.read_text())
        record.details["proposed_tuned"] = payload["proposed_tuned"]
        record.details["on_chip_vs_l2"] = payload["on_chip_vs_l2"]


FUNCTIONS: dict[str, StepFunction] = {
    "setup": setup,
    "build": build,
    "tests": tests,
    "headline": headline_step,
    "linear_loss": linear_loss,
    "train_step": train_step,
    "tune": tune,
}
