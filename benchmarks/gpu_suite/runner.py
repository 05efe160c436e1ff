"""Running the plan: each step under its enforced budget, in priority order, its record and
files written to $OUT as soon as it ends, the state file consulted and updated.

A step's work runs in subprocesses (``run_logged``), each killed with its whole process group
when the step's budget runs out; the step is then recorded ``timeout`` and the next one starts.
A step that fails is recorded ``failed`` with the end of its log; the others still run. Steps
recorded ``ok`` in the state file for the current kernel sources and GPU are skipped
(``done_before``); a step that would start with too little time left is ``not_started``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.gpu_suite import state
from benchmarks.gpu_suite.plan import (
    BY_NAME,
    DEADLINE_S,
    OUT_MAX_FILE_BYTES,
    OUT_MAX_FILES,
    REPO_ROOT,
    STEPS,
    PlannedStep,
    planned,
)

WORK_DIR = REPO_ROOT / "build" / "gpu_suite"  # ignored by git: records and logs of a run
# Where --collect puts a bundled file back, by the folder that held it.
RESULTS_ARC, WORK_ARC = "benchmarks/results", "build/gpu_suite"
SUITE_JSON = "suite.json"
# A step starts only with at least this share of its estimate left before the deadline.
MIN_START_SHARE = 0.5
# A dry run's budget per step: its CPU times say nothing of the GPU's, only that it ends.
DRY_RUN_BUDGET_S = 600


@dataclass
class Context:
    """Where a run reads and writes: ``work`` (records, logs), ``results`` (benchmark outputs),
    ``out`` ($OUT: bundles and suite.json), ``state_path``; the clock; what setup found (``device``:
    the probe's record) and the environment its children get (``env``: the carried wheels)."""

    dry_run: bool
    work: Path
    results: Path
    out: Path | None
    state_path: Path
    deadline_s: float = DEADLINE_S
    started: float = field(default_factory=time.monotonic)
    device: dict = field(default_factory=dict)
    # The machine has no network: libraries that would ask the Hugging Face Hub are told not to.
    env: dict[str, str] = field(default_factory=lambda: {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    source_hash: str = field(default_factory=state.kernel_source_hash)

    @property
    def steps_dir(self) -> Path:
        return self.work / "steps"

    @property
    def device_name(self) -> str:
        return self.device.get("device", "unknown")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.deadline_s - self.elapsed()

    def log(self, name: str) -> Path:
        return self.steps_dir / f"{name}.log"


@dataclass
class StepRecord:
    """What one step did: status ok, failed, timeout, skipped (cannot run here), done_before (the
    state file has it for these sources and this GPU) or not_started (too little time left)."""

    step: str
    item: str
    status: str = "ok"
    seconds: float = 0.0
    estimate_s: float = 0.0
    budget_s: float = 0.0
    source_hash: str = ""
    device: str = ""
    date: str = ""
    commands: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def entry(self) -> state.Entry:
        return state.Entry(
            self.step, self.source_hash, self.device, self.status, self.seconds, self.date, self.outputs, self.notes
        )


StepFunction = Callable[[Context, float, StepRecord], None]


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ---- Subprocesses under a budget ---------------------------------------------------------------


def run_logged(
    argv: list[str], log: Path, timeout_s: float, ctx: Context, env: dict[str, str] | None = None
) -> tuple[int, bool]:
    """Run ``argv`` from the repository root, its output appended to ``log``: (return code, timed
    out). On timeout the whole process group is killed: benchmarks start probe subprocesses,
    pytest workers and torch.compile workers that would outlive their parent."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(f"$ {shlex.join(argv)}\n")
        handle.flush()
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=os.environ | ctx.env | (env or {}) | {"PYTHONUNBUFFERED": "1"},
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
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# ---- Files a step leaves ---------------------------------------------------------------------


def arcname(ctx: Context, path: Path) -> str:
    """A file's name in its bundle: its path relative to the repository root as --collect
    restores it (a dry run's temporary folders stand for benchmarks/results and build/gpu_suite)."""
    path = path.resolve()
    for folder, name in ((ctx.results, RESULTS_ARC), (ctx.work, WORK_ARC)):
        if path.is_relative_to(folder.resolve()):
            return f"{name}/{path.relative_to(folder.resolve()).as_posix()}"
    raise ValueError(f"{path} is neither under {ctx.results} nor {ctx.work}")


def local_path(ctx: Context, name: str) -> Path:
    for folder, prefix in ((ctx.results, RESULTS_ARC), (ctx.work, WORK_ARC)):
        if name.startswith(prefix + "/"):
            return folder / name.removeprefix(prefix + "/")
    raise ValueError(name)


def bundle(ctx: Context, record: StepRecord) -> Path | None:
    """``<out>/<step>.tar.gz``: the step's outputs, log and record, smallest first; a member that
    would take it past the run tool's per-file limit is left out (and said so in the record)."""
    if ctx.out is None:
        return None
    files = [local_path(ctx, o) for o in record.outputs] + [ctx.log(record.step), ctx.steps_dir / f"{record.step}.json"]
    ctx.out.mkdir(parents=True, exist_ok=True)
    target = ctx.out / f"{record.step}.tar.gz"
    room = OUT_MAX_FILE_BYTES - (256 << 10)
    with tarfile.open(target, "w:gz") as tar:
        for path in sorted({f for f in files if f.exists()}, key=lambda p: p.stat().st_size):
            if path.stat().st_size > room:
                record.notes.append(f"{path.name} ({path.stat().st_size >> 20} MiB) left out of {target.name}")
                continue
            room -= path.stat().st_size
            tar.add(path, arcname=arcname(ctx, path))
    return target


def write_suite_json(ctx: Context, records: list[StepRecord]) -> Path | None:
    """``<out>/suite.json``: every step's record so far, the device and the kernel source hash."""
    if ctx.out is None:
        return None
    ctx.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "gpu_suite",
        "date": now(),
        "dry_run": ctx.dry_run,
        "source_hash": ctx.source_hash,
        "device": ctx.device,
        "elapsed_s": ctx.elapsed(),
        "deadline_s": ctx.deadline_s,
        "records": [asdict(r) for r in records],
    }
    path = ctx.out / SUITE_JSON
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def finish(ctx: Context, record: StepRecord, records: list[StepRecord]) -> None:
    """Write the record, its bundle (steps that ran) and suite.json; record the step in the state
    file of this run (the device's copy comes back through --collect)."""
    ctx.steps_dir.mkdir(parents=True, exist_ok=True)
    path = ctx.steps_dir / f"{record.step}.json"
    path.write_text(json.dumps(asdict(record), indent=2) + "\n")
    ran = record.status in ("ok", "failed", "timeout")
    if ran and BY_NAME[record.step].recorded:
        state.save(state.merge(state.load(ctx.state_path), [record.entry()]), ctx.state_path)
    if ran:
        bundle(ctx, record)
        path.write_text(json.dumps(asdict(record), indent=2) + "\n")  # with any note the bundle added
    records.append(record)
    write_suite_json(ctx, records)
    if ctx.out is not None and sum(1 for p in ctx.out.iterdir() if p.is_file()) > OUT_MAX_FILES:
        print(f"[gpu_suite] warning: more than {OUT_MAX_FILES} files in $OUT; the run tool returns {OUT_MAX_FILES}")


# ---- The loop ------------------------------------------------------------------------------------


def not_run(ctx: Context, names: list[str], force: bool) -> dict[str, tuple[str, str]]:
    """The steps of ``names`` that do not run, with their status and why: a recorded step done before
    for these sources on this GPU (``done_before``); a step for another that does not run (the build,
    for the tests: ``skipped``)."""
    entries = state.load(ctx.state_path)
    why: dict[str, tuple[str, str]] = {}
    for name in names:
        step = BY_NAME[name]
        if step.recorded and not force and (entry := state.done(entries, name, ctx.source_hash, ctx.device_name)):
            why[name] = ("done_before", f"measured before for these kernel sources on this GPU ({entry.date})")
    for name in names:
        step = BY_NAME[name]
        if step.for_step and (step.for_step not in names or step.for_step in why):
            why[name] = ("skipped", f"only for {step.for_step}, which does not run")
    return why


def run_plan(
    ctx: Context,
    functions: dict[str, StepFunction],
    names: list[str] | None = None,
    force: bool = False,
) -> list[StepRecord]:
    """Run the plan's steps (``names``: a subset, with the steps they need; the plan's order either
    way). Setup runs first, always: it finds the GPU (the state's key) and installs the carried
    wheels; without CUDA (and not dry) the other steps are skipped."""
    wanted = set(names or BY_NAME)
    names = [s.name for s in STEPS if s.name in wanted or s.name == "setup" or s.for_step in wanted]
    records: list[StepRecord] = []

    def plan() -> dict[str, PlannedStep]:
        entries = state.load(ctx.state_path)
        return {p.step.name: p for p in planned(lambda n: state.measured(entries, n, ctx.device_name))}

    finish(ctx, run_step(ctx, plan()["setup"], functions["setup"]), records)
    after_setup = plan()
    skip = not_run(ctx, names, force)
    if not ctx.dry_run and ctx.device.get("device_type") != "cuda":
        skip = dict.fromkeys(
            names, ("skipped", "torch sees no CUDA device here (run it on the GPU machine, or --dry-run)")
        )
    for name in names[1:]:
        if name in skip:
            status, why = skip[name]
            record = new_record(ctx, after_setup[name], status=status)
            record.notes.append(why)
            report(record)
            finish(ctx, record, records)
            continue
        finish(ctx, run_step(ctx, after_setup[name], functions[name]), records)
    closing_table(records)
    return records


def new_record(ctx: Context, planned_step: PlannedStep, status: str = "ok") -> StepRecord:
    step = planned_step.step
    return StepRecord(
        step.name,
        step.item,
        status=status,
        estimate_s=planned_step.estimate.seconds,
        budget_s=planned_step.budget_s,
        source_hash=ctx.source_hash,
        device=ctx.device_name,
        date=now(),
    )


def run_step(ctx: Context, planned_step: PlannedStep, function: StepFunction) -> StepRecord:
    """One step within its budget, or the time left before the deadline when that is less."""
    record = new_record(ctx, planned_step)
    budget = min(DRY_RUN_BUDGET_S if ctx.dry_run else planned_step.budget_s, ctx.remaining())
    record.budget_s = max(budget, 0)
    print(f"\n=== {record.step} ({record.item}; estimate {record.estimate_s:.0f} s, budget {budget:.0f} s)", flush=True)
    if budget < MIN_START_SHARE * planned_step.estimate.seconds:
        record.status = "not_started"
        record.notes.append(
            f"only {max(budget, 0):.0f} s left before the call's deadline ({ctx.deadline_s:.0f} s): the next "
            "call starts here"
        )
    else:
        start = time.monotonic()
        try:
            function(ctx, budget, record)
        except Exception as error:  # noqa: BLE001 - one step's failure must not stop the others
            record.status = "failed"
            record.notes.append(f"{type(error).__name__}: {error}"[:2000])
        record.seconds = time.monotonic() - start
    record.device = ctx.device_name
    report(record, ctx)
    return record


def report(record: StepRecord, ctx: Context | None = None) -> None:
    lines = [f"--- {record.step}: {record.status} in {record.seconds:.0f} s"]
    lines += [f"    {note}" for note in record.notes]
    if ctx is not None and record.status in ("failed", "timeout"):
        lines.append(tail(ctx.log(record.step), 40))
    print("\n".join(lines), flush=True)


def closing_table(records: list[StepRecord]) -> None:
    """The table the run tool's reply ends with (its output_tail)."""
    print("\n| step | item | status | seconds | estimate s | budget s | outputs |\n|---|---|---|---:|---:|---:|---:|")
    for r in records:
        print(
            f"| {r.step} | {r.item} | {r.status} | {r.seconds:.0f} | {r.estimate_s:.0f} | {r.budget_s:.0f} | "
            f"{len(r.outputs)} |"
        )


# ---- Back here -------------------------------------------------------------------------------------


def collect(source: Path, root: Path = REPO_ROOT, state_path: Path | None = None) -> list[Path]:
    """Unpack every ``*.tar.gz`` under ``source`` into ``root`` (results into benchmarks/results/,
    records and logs into build/gpu_suite/; members elsewhere are refused) and merge the records of
    ``suite.json`` into the state file (``state_path``, default root's)."""
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
    suites = sorted(Path(source).rglob(SUITE_JSON))
    state_path = state_path or root / state.STATE_FILE.relative_to(REPO_ROOT)
    for suite in suites:
        payload = json.loads(suite.read_text())
        if payload.get("dry_run"):
            continue
        new = [
            StepRecord(**r).entry()
            for r in payload["records"]
            if r["status"] in ("ok", "failed", "timeout") and BY_NAME[r["step"]].recorded
        ]
        if new:
            state.save(state.merge(state.load(state_path), new), state_path)
            written.append(state_path)
    return written
