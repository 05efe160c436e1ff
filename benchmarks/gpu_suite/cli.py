"""The suite's command line: --plan (default), --dry-run, --prepare, --run, --collect."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_suite import plan as plan_module
from benchmarks.gpu_suite import runner, state, steps, wheels
from benchmarks.gpu_suite.plan import (
    BY_NAME,
    CALL_WALL_S,
    CARRY_DIR,
    CLOSE_S,
    COMMAND_TIMEOUT_S,
    DEADLINE_S,
    LEADS,
    MACHINE_START_S,
    PLAN_DEVICE,
    REPO_ROOT,
    RESULTS_DIR,
    STEPS,
    TRANSFER_S,
    planned,
    run_call,
    total_s,
)

FAILURES = (
    "When a step fails or overruns: its budget is enforced by killing its process group; it is recorded "
    "`failed` or `timeout` (its JSON in $OUT/<step>.tar.gz and $OUT/suite.json says so, with the end of its "
    "log) and the next step starts; the benchmarks keep a margin inside their budget (--time-budget-s) so that "
    "a cut run still writes what it measured. A step that would start with less than half its estimate left "
    "before the deadline is `not_started`. Steps recorded `ok` for these kernel sources on this GPU are skipped "
    "next time (`done_before`), so the next session's call starts where this one stopped; failed, timed-out and "
    "unstarted steps run again. The command exits 1 when a step that ran did not end ok."
)


def plan_text(state_path: Path = state.STATE_FILE) -> tuple[str, bool]:
    """The plan as printed by --plan and --dry-run (steps measured before on the plan's GPU, in
    ``state_path``, estimated by that time), and whether it fits one call."""
    entries = state.load(state_path)
    steps_planned = planned(lambda name: state.measured(entries, name, PLAN_DEVICE))
    source_hash = state.kernel_source_hash()
    total = total_s(steps_planned)
    fits = total <= DEADLINE_S
    lines = [
        f"GPU suite: one run-tool call of at most {CALL_WALL_S // 60} min from the machine's start to the reply: "
        f"start ~{MACHINE_START_S} s + transfers ~{TRANSFER_S} s + the command (timeout_s={COMMAND_TIMEOUT_S}); "
        f"no step runs past {DEADLINE_S} s of the command ({CLOSE_S} s kept to close).",
        "",
        "The call, from the checkout the session was started in (its tree travels; run-tool notes):",
        "  python -m benchmarks.gpu_suite --prepare        # here, once: wheels + tokenizer into "
        f"{CARRY_DIR}/ (add --check to try them)",
        f"  {run_call()}",
        "  python -m benchmarks.gpu_suite --collect <the reply's files_at>   # results + state file here",
        "  python -m benchmarks.readme_tables; git add benchmarks/results; commit",
        "",
        f"| item | step | estimate s | budget s | next call on {PLAN_DEVICE} | what |",
        "|---|---|---:|---:|---|---|",
    ]
    for p in steps_planned:
        done = state.done(entries, p.step.name, source_hash, PLAN_DEVICE)
        next_call = f"skipped (done {done.date[:10]})" if done else "runs"
        if p.step.for_step:
            next_call = f"with {p.step.for_step}"
        measured = " (measured)" if p.measured else ""
        lines.append(
            f"| {p.step.item} | {p.step.name} | {p.estimate.seconds:.0f}{measured} | {p.budget_s} | {next_call} | "
            f"{p.step.what} |"
        )
    verdict = "fits" if fits else "DOES NOT FIT"
    lines.append(
        f"| | (the suite's start) | {LEADS['suite_start_s'].value:.0f} | | | imports and the plan, before setup |"
    )
    lines += [
        f"| | total | {total:.0f} | | | {verdict}: steps may take {DEADLINE_S} s of the command's "
        f"{COMMAND_TIMEOUT_S} |",
        "",
        "Time model of each step (seconds). A step run on this GPU before is estimated by that run instead: "
        "its time + 10% when it ended, at least half again its budget when the budget stopped it:",
    ]
    lines += [f"  {p.step.name}: {p.estimate.model}" for p in steps_planned]
    lines += ["", "Leads of the model:"]
    lines += [f"  {name} = {lead.value:g}: {lead.source}" for name, lead in LEADS.items()]
    lines += [
        "",
        FAILURES,
        "",
        f"Kernel sources {', '.join(state.KERNEL_SOURCES)}: hash {source_hash}; state file "
        f"{_shown(state_path)} ({len(entries)} entries).",
    ]
    return "\n".join(lines), fits


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=plan_module.__doc__.split("\n")[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--plan", action="store_true", help="print the plan, its time model and the call (default)")
    what.add_argument("--dry-run", action="store_true", help="the plan, then every step on a tiny grid on the CPU")
    what.add_argument("--prepare", action="store_true", help=f"here: wheels and tokenizer into {CARRY_DIR}/")
    what.add_argument("--run", action="store_true", help="on the GPU machine: the plan's steps, results to $OUT")
    what.add_argument("--collect", type=Path, metavar="DIR", help="unpack what a call returned; update the state")
    p.add_argument(
        "--check", action="store_true", help="with --prepare: install the wheels as the machine does, try them"
    )
    p.add_argument("--only", help=f"with --run/--dry-run: these steps (comma-separated: {', '.join(BY_NAME)})")
    p.add_argument("--force", action="store_true", help="with --run/--dry-run: run steps the state file has")
    p.add_argument("--work-dir", type=Path, help="with --dry-run: where to write (default: a temporary folder)")
    p.add_argument("--state", type=Path, default=state.STATE_FILE, help="the state file (default: the committed one)")
    p.add_argument(
        "--deadline-s",
        type=float,
        help=f"stop starting steps this many seconds after the start (default: {DEADLINE_S} with --run, none dry)",
    )
    return p.parse_args(argv)


def _names(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if unknown := [n for n in names if n not in BY_NAME]:
        raise SystemExit(f"unknown steps {unknown}; steps: {', '.join(BY_NAME)}")
    return names


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    args = parse_args(argv)
    started = started or time.monotonic()
    if args.prepare:
        manifest = wheels.prepare()
        for entry in manifest["wheels"]:
            print(f"{entry['file']}: {entry['bytes'] >> 10} KiB ({entry['why']})")
        print(f"tokenizer: {manifest['tokenizer']}")
        print(f"{CARRY_DIR}/ {manifest['carry_bytes'] >> 20} MiB + tree {manifest['tree_bytes'] >> 20} MiB travel")
        if args.check:
            print(wheels.check_install())
        return 0
    if args.collect:
        written = runner.collect(args.collect, state_path=args.state)
        for path in written:
            print(f"collected {path.relative_to(REPO_ROOT)}")
        print(f"{len(written)} files; next: python -m benchmarks.readme_tables, then commit benchmarks/results/")
        return 0
    if args.run or args.dry_run:
        if args.dry_run:
            text, fits = plan_text(args.state)
            print(text)
            # Into a temporary folder, with a copy of the state file: a dry run changes nothing here.
            work = (args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_suite-dry-"))).resolve()
            work.mkdir(parents=True, exist_ok=True)
            state_path = work / "state.json"
            if not state_path.exists() and args.state.exists():
                shutil.copy(args.state, state_path)
            deadline = args.deadline_s or float("inf")  # CPU times say nothing of the GPU's
            ctx = runner.Context(True, work, work / "results", work / "out", state_path, deadline, started)
            print(f"\nDry run on the CPU into {work} ($OUT: {ctx.out})")
        else:
            fits = True
            out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
            deadline = args.deadline_s or DEADLINE_S
            ctx = runner.Context(False, runner.WORK_DIR, RESULTS_DIR, out, args.state, deadline, started)
        records = runner.run_plan(ctx, steps.FUNCTIONS, _names(args.only), args.force)
        ok = all(r.status in ("ok", "skipped", "done_before", "not_started") for r in records)
        return 0 if ok and fits else 1
    text, fits = plan_text(args.state)
    print(text)
    return 0 if fits else 1


__all__ = ["main", "plan_text", "STEPS"]
