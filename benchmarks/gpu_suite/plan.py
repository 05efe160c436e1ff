"""The plan of one GPU-suite call: the run tool's limits, the steps in priority order with their
grids, and the time model that must show the whole plan fits one call.

A session that draws a GPU has 15 minutes of device time in all, machine starts included, and
one command runs at most 10 minutes (/work/.library/device/README.md). The suite is one run-tool
call of at most ``CALL_WALL_S`` (9 minutes) from the machine's start to the reply, which leaves
the session time to run it again. Each step's time is estimated from its grid with the model its
``estimate`` function states, from the ``LEADS`` below (each with where it comes from); a step
measured on the GPU before (the state file) is estimated by that measurement instead.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import _util

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MINUTE = 60

# ---- The run tool's limits and the call ------------------------------------------------------

CALL_WALL_S = 9 * MINUTE  # one suite call, the machine's start to the reply (issue 21 item 6)
# Leads: "a minute or more" to start a machine (device README); the tree (about 5 MiB) and the
# carried wheels go there and $OUT comes back in the transfers.
MACHINE_START_S = 90
TRANSFER_S = 20
# The run call's timeout_s: what is left of the call for the command itself.
COMMAND_TIMEOUT_S = CALL_WALL_S - MACHINE_START_S - TRANSFER_S
# Kept after the last step: its bundle, suite.json and the closing table.
CLOSE_S = 15
# No step runs past this many seconds after the suite started.
DEADLINE_S = COMMAND_TIMEOUT_S - CLOSE_S
# What comes back from $OUT (files, bytes per file) and what may travel (working tree + carry).
OUT_MAX_FILES = 8
OUT_MAX_FILE_BYTES = 16 << 20
TREE_MAX_BYTES = 64 << 20
# The ignored folder --prepare fills and the run call carries (wheels the device lacks, SmolLM2's
# tokenizer for the random-weight models); .gitignore names it.
CARRY_DIR = ".gpu_carry"
RUN_COMMAND = "PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_suite --run"
# Which GPU the plan is for: the kind the device tool lends this project.
PLAN_DEVICE = "NVIDIA H200"


def run_call() -> str:
    """The one device-tool call a session makes, exactly."""
    return f'run(command="{RUN_COMMAND}", carry=["{CARRY_DIR}"], timeout_s={COMMAND_TIMEOUT_S})'


# ---- Leads of the time model -------------------------------------------------------------------


@dataclass(frozen=True)
class Lead:
    """A number the time model uses, and where it comes from."""

    value: float
    source: str


LEADS = {
    "copy_bytes_per_s": Lead(4.3e12, "KINDS.md: device-to-device copy on this workplace's H200s (2026-10-28, -11-04)"),
    "bf16_flops_per_s": Lead(7.8e14, "KINDS.md: 8192^3 bf16 matmul on random data there, 769-798 TFLOP/s"),
    "efficiency": Lead(0.5, "assumed share of those ceilings a timed case reaches (a pessimistic guess)"),
    "train_efficiency": Lead(0.3, "assumed share of the bf16 matmul rate an eager HF training step reaches"),
    "int8_slowdown": Lead(2.0, "guess: LLM.int8 matmuls (bitsandbytes) against bf16"),
    "python_start_s": Lead(8.0, "guess: python3 importing torch, triton, nlft_kernels and making a CUDA context"),
    "transformers_start_s": Lead(12.0, "guess: the same with transformers and peft imported"),
    "suite_start_s": Lead(
        12.0,
        "guess: the suite's start there before its first step: imports, the plan (pytest collecting the GPU tests)",
    ),
    "pip_install_s": Lead(10.0, "guess: pip installing the carried wheels offline"),
    "build_cpu_s": Lead(
        52.0,
        "measured here, 2026-12-04: user + sys CPU seconds of NLFT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 "
        "python setup.py build_ext --inplace (torch 2.14.1, nvcc 13.0), as if its compile units ran one by one",
    ),
    "triton_compile_s": Lead(
        1.5,
        "measured here, 2026-12-04: 0.6-1.0 s per sm_90 row-pass variant (tests/ops/compile_kernels."
        "compile_variant on a loaded 2-core machine), rounded up for the JIT's launch path",
    ),
    "torch_compile_s": Lead(45.0, "guess: inductor compiling F.cross_entropy forward+backward and its no_grad forward"),
    "gpu_test_s": Lead(0.3, "guess: one GPU test's own run time, its compiles apart"),
    "duplicate_compiles": Lead(1.5, "guess: how many pytest-xdist workers compile each Triton variant on average"),
    "decode_step_s": Lead(0.025, "guess: one HF generate step of a 3B Llama at batch 8, eager"),
    "weights_s_per_billion": Lead(2.5, "guess: seconds per billion parameters to draw random weights on the GPU"),
}


def lead(name: str) -> float:
    return LEADS[name].value


# ---- The grids ---------------------------------------------------------------------------------

# Extra calls the harness makes per timed case besides --warmup and --reps: do_bench's first calls
# and estimates, and one call for the peak memory.
HARNESS_EXTRA_CALLS = _util.DO_BENCH_EXTRA_CALLS + 1


@dataclass(frozen=True)
class LossGrid:
    """(b) bench_loss on one shape: the headline."""

    n: int = 8192
    vocab: int = 128256
    dtype: str = "bfloat16"
    rows_per_sample: int = 128
    # Liger last: it writes its gradient into its input (bench_loss runs the cases in this order).
    cases: tuple[str, ...] = ("nlft_kernels", "compiled_cross_entropy_x3", "liger_cross_entropy_x3")
    warmup: int = 5
    reps: int = 30


@dataclass(frozen=True)
class LinearGrid:
    """(c) bench_linear_loss on one shape."""

    n: int = 8192
    dim: int = 4096
    vocab: int = 128256
    dtype: str = "bfloat16"
    cases: tuple[str, ...] = ("nlft_linear_loss", "liger_flce", "cut_cross_entropy")
    warmup: int = 2
    reps: int = 10


@dataclass(frozen=True)
class TrainGrid:
    """(d) bench_train_step in the paper's regime: Llama-3.2-3B-shaped random weights, NLFT with LoRA
    r=16 on 8-bit base weights against ReFT's full fine-tuning (reference model, value head)."""

    model: str = "llama3.2-3b"
    parameters: float = 3.21e9  # Llama-3.2-3B, its embeddings tied to the LM head
    base_weights: str = "int8"
    methods: tuple[str, ...] = ("nlft_kernels_lora", "reft_no_sampling")
    batch_size: int = 8
    prompt_tokens: int = 300
    response_tokens: int = 300
    teacher_tokens: int = 300
    reft_max_length: int = 700  # ReFT's own cap, prompt included
    warmup: int = 2  # the cold call included
    reps: int = 3


@dataclass(frozen=True)
class TuneGrid:
    """(e) tune_launch on the headline's kernel: every candidate of every launch option."""

    # The Triton kernel's launch options (its L2 eviction hints among them), then the CUDA row
    # pass one block per row against on chip: together, the on_chip_vs_l2 decision.
    keys: tuple[str, ...] = ("row_pass:3", "cuda_row_pass:3")
    vocabs: tuple[int, ...] = (128256,)
    dtypes: tuple[str, ...] = ("bfloat16",)
    rows: int = 8192
    warmup: int = 2
    reps: int = 10


@dataclass(frozen=True)
class TestsGrid:
    """(a) the tests marked gpu or gpu_too, in parallel, each stopped after ``timeout_s``."""

    marks: str = "gpu or gpu_too"
    workers: int = 12
    timeout_s: int = 120


LOSS, LINEAR, TRAIN, TUNE, TESTS = LossGrid(), LinearGrid(), TrainGrid(), TuneGrid(), TestsGrid()

GPU_MARK = re.compile(r"\bpytest\.mark\.gpu(_too)?\b")


def gpu_test_files(root: Path = REPO_ROOT) -> list[str]:
    """The test files that mark tests ``gpu`` or ``gpu_too`` (found anew each run, so new GPU tests
    join). Only these are collected: other modules set TRITON_INTERPRET=1 at import, which would
    interpret Triton on the GPU."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in (root / "tests").rglob("test_*.py")
        if GPU_MARK.search(p.read_text(encoding="utf-8"))
    )


@functools.cache
def count_gpu_tests() -> int:
    """How many tests the tests step runs (pytest's collection of ``gpu_test_files`` under
    ``TESTS.marks``; the parametrisation does not depend on the device)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", TESTS.marks]
        + gpu_test_files(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = re.search(r"(\d+)(?:/\d+)? tests? collected", done.stdout)
    if found is None:
        raise RuntimeError(f"pytest collected nothing:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return int(found.group(1))


@functools.cache
def triton_variants(arch: str = "sm_90") -> int:
    """Distinct Triton variants the package launches (the AOT record, tests/ops/compile_kernels.py):
    at most what the GPU tests compile; the most over the record's Triton versions (one section
    each: the CI's and the lent machines')."""
    report = json.loads((RESULTS_DIR / "aot_triton_kernels.json").read_text())
    sections = report["triton_versions"].values()
    return max(sum(1 for v in section["variants"] if v["arch"] == arch) for section in sections)


# ---- Estimates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Seconds a step should take on the plan's GPU, and the arithmetic that gave them."""

    seconds: float
    model: str


def _calls(warmup: int, reps: int) -> int:
    return warmup + reps + HARNESS_EXTRA_CALLS


def estimate_setup() -> Estimate:
    s = lead("pip_install_s") + lead("python_start_s")
    return Estimate(
        s,
        f"pip install of the carried wheels {lead('pip_install_s'):.0f} + a device probe {lead('python_start_s'):.0f}",
    )


def estimate_build() -> Estimate:
    s = lead("build_cpu_s") + lead("python_start_s")
    return Estimate(
        s,
        f"the build's CPU seconds measured here {lead('build_cpu_s'):.0f} (as if serial) + start "
        f"{lead('python_start_s'):.0f}",
    )


def estimate_tests() -> Estimate:
    tests, variants, w = count_gpu_tests(), triton_variants(), TESTS.workers
    compile_s, test_s, dup = lead("triton_compile_s"), lead("gpu_test_s"), lead("duplicate_compiles")
    start = 2 * lead("python_start_s")
    s = start + (dup * variants * compile_s + tests * test_s) / w
    return Estimate(
        s,
        f"workers' start {start:.0f} + ({dup} x {variants} Triton variants x {compile_s} s + {tests} tests x "
        f"{test_s} s) / {w} workers",
    )


def loss_bytes(case: str) -> int:
    """Bytes the headline shape moves for ``case``'s job (bench_loss.bytes_moved: the traffic model
    of nlft_kernels.ops.launch)."""
    from benchmarks import bench_loss

    return bench_loss.bytes_moved(case, LOSS.n, LOSS.vocab, LOSS.dtype)


# Kernel variants compiled per case at one shape and dtype (forward with gradient, the row
# scaling, the label log-prob kernels: a guess from ops/), and Liger's kernel with and without
# gradient; the compiled case costs torch_compile_s instead.
LOSS_COMPILES = {"nlft_kernels": 4, "liger_cross_entropy_x3": 2, "cross_entropy": 0}


def estimate_headline() -> Estimate:
    rate = lead("efficiency") * lead("copy_bytes_per_s")
    parts, s = [], lead("python_start_s") + 3  # start; the 1 GiB copy and the [3, N, V] inputs
    for case in LOSS.cases:
        ms = 1e3 * loss_bytes(case) / rate
        compile_s = (
            lead("torch_compile_s") if case.startswith("compiled") else LOSS_COMPILES[case] * lead("triton_compile_s")
        )
        calls = _calls(LOSS.warmup, LOSS.reps)
        s += compile_s + calls * ms / 1e3
        parts.append(f"{case} {compile_s:.0f} + {calls} x {ms:.1f} ms")
    return Estimate(
        s,
        f"start + inputs {lead('python_start_s') + 3:.0f}; per case compile + calls x bytes / "
        f"({lead('efficiency')} x copy): " + "; ".join(parts),
    )


LINEAR_COMPILES = {"nlft_linear_loss": 6, "liger_flce": 2, "cut_cross_entropy": 3}


def estimate_linear() -> Estimate:
    g = LINEAR
    flops = 10 * g.n * g.vocab * g.dim  # bench_linear_loss.floor: 3 forward + 2 gradient matmuls
    ms = 1e3 * flops / (lead("efficiency") * lead("bf16_flops_per_s"))
    calls = _calls(g.warmup, g.reps) + 1  # and check_saliency's forward
    compiles = sum(LINEAR_COMPILES[c] for c in g.cases) * lead("triton_compile_s")
    s = lead("python_start_s") + 5 + compiles + len(g.cases) * calls * ms / 1e3
    return Estimate(
        s,
        f"start + inputs + matmul rate {lead('python_start_s') + 5:.0f} + compiles {compiles:.0f} + "
        f"{len(g.cases)} cases x {calls} calls x 10 N V D / ({lead('efficiency')} x bf16 rate) = {ms:.0f} ms",
    )


def train_step_seconds(method: str) -> float:
    """One step of ``method`` on the train grid from its matmul FLOPs (2 per parameter and token
    forward, 4 backward): NLFT with LoRA runs the base view forward and backward (input gradients
    through every layer) and the two teacher views forward; ReFT's PPO iteration runs the policy,
    reference and value forwards and two epochs of forward + backward on prompt + sampled tokens."""
    g = TRAIN
    p, rate = g.parameters, lead("train_efficiency") * lead("bf16_flops_per_s")
    base = g.batch_size * (g.prompt_tokens + g.response_tokens)
    if method.startswith("nlft"):
        teachers = 2 * g.batch_size * (g.prompt_tokens + g.teacher_tokens + g.response_tokens)
        flops = 4 * p * base + 2 * p * teachers
        slowdown = lead("int8_slowdown") if g.base_weights == "int8" else 1.0
        return slowdown * flops / rate
    tokens = g.batch_size * g.reft_max_length  # random weights never sample EOS: every response to the cap
    return (3 * 2 * p * tokens + 2 * 6 * p * tokens) / rate


def estimate_train() -> Estimate:
    g = TRAIN
    billions = g.parameters / 1e9
    parts, s = [], 5.0  # prepare: tokenise the batch, write the config
    for method in g.methods:
        copies = 2 if method.startswith("reft") else 1  # ReFT's frozen reference copy
        setup = lead("transformers_start_s") + copies * billions * lead("weights_s_per_billion")
        if method == "reft_no_sampling":  # responses sampled once before the timed steps
            setup += (g.reft_max_length - g.prompt_tokens) * lead("decode_step_s")
        step = train_step_seconds(method)
        s += setup + (g.warmup + g.reps) * step
        parts.append(f"{method} {setup:.0f} + {g.warmup + g.reps} x {step:.1f} s")
    return Estimate(
        s,
        f"prepare 5; per method start + weights (+ sampling) + steps x FLOPs / "
        f"({lead('train_efficiency')} x bf16 rate): " + "; ".join(parts),
    )


def tune_candidates() -> int:
    """Candidates tune_launch times over TUNE's keys, vocabularies and dtypes."""
    import torch

    from benchmarks import tune_launch

    count = 0
    for key in TUNE.keys:
        family, streams = tune_launch.parse_key(key)
        for vocab in TUNE.vocabs:
            for dtype in TUNE.dtypes:
                count += len(tune_launch.tunable(family, vocab, streams, getattr(torch, dtype), None).candidates)
    return count


def estimate_tune() -> Estimate:
    n = tune_candidates()
    # The row pass with three logit views and a gradient, in the launch table's traffic model.
    elem = max({"bfloat16": 2, "float16": 2, "float32": 4}[d] for d in TUNE.dtypes)
    nbytes = _util.nlft_row_pass_bytes(TUNE.rows, max(TUNE.vocabs), elem, 2, elem)
    ms = 1e3 * nbytes / (lead("efficiency") * lead("copy_bytes_per_s"))
    calls = _calls(TUNE.warmup, TUNE.reps) - 1  # no peak-memory call
    s = lead("python_start_s") + n * (lead("triton_compile_s") + calls * ms / 1e3)
    return Estimate(
        s,
        f"start {lead('python_start_s'):.0f} + {n} candidates x (compile {lead('triton_compile_s')} + "
        f"{calls} calls x {ms:.1f} ms)",
    )


# ---- The steps ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step of the suite: its issue item, what it does, its time model, and whether it is
    recorded in the state file (skipped next time for the same kernel sources and GPU); ``for_step``:
    run only when that step runs (the build is for the tests)."""

    name: str
    item: str
    what: str
    estimate: Callable[[], Estimate]
    recorded: bool = True
    for_step: str | None = None

    def budget_s(self, estimate_s: float) -> int:
        """The enforced budget: half again the estimate, at least 30 s more (a step past it is stopped)."""
        return int(5 * -(-max(1.5 * estimate_s, estimate_s + 30) // 5))


STEPS = (
    Step(
        "setup",
        "a",
        "install the carried wheels the device lacks; record the GPU and versions",
        estimate_setup,
        recorded=False,
    ),
    Step(
        "build",
        "a",
        "build nlft_kernels._C in place with its CUDA kernel for this GPU only",
        estimate_build,
        recorded=False,
        for_step="tests",
    ),
    Step(
        "tests",
        "a",
        f"pytest -n {TESTS.workers} --timeout {TESTS.timeout_s} -m '{TESTS.marks}' on the GPU test files",
        estimate_tests,
    ),
    Step(
        "headline",
        "b",
        f"copy bandwidth, then nlft_loss 3 views {LOSS.dtype} N={LOSS.n} V={LOSS.vocab} fwd+bwd "
        "against 3x Liger CE and torch.compile'd CE (bench_loss); gpu_headline_*.json",
        estimate_headline,
    ),
    Step(
        "linear_loss",
        "c",
        f"nlft_linear_loss N={LINEAR.n} D={LINEAR.dim} V={LINEAR.vocab} {LINEAR.dtype} against "
        "Liger FLCE and Cut Cross-Entropy (bench_linear_loss)",
        estimate_linear,
    ),
    Step(
        "train_step",
        "d",
        f"{TRAIN.model} random weights: NLFT LoRA r=16 on {TRAIN.base_weights} base weights against "
        "ReFT full fine-tuning (bench_train_step --setting paper)",
        estimate_train,
    ),
    Step(
        "tune",
        "e",
        f"tune_launch {', '.join(TUNE.keys)} V={','.join(map(str, TUNE.vocabs))}: every launch option's candidates",
        estimate_tune,
    ),
)
BY_NAME = {s.name: s for s in STEPS}


@dataclass(frozen=True)
class PlannedStep:
    step: Step
    estimate: Estimate
    measured: bool  # the estimate is a GPU measurement from the state file
    budget_s: int


@dataclass(frozen=True)
class Measured:
    """A step's newest run on the plan's GPU: its seconds, and whether it ended (else its budget
    stopped it, and the seconds are a lower bound)."""

    seconds: float
    ended: bool


def planned(measured: Callable[[str], Measured | None] = lambda name: None) -> list[PlannedStep]:
    """Every step with its estimate and enforced budget. ``measured(name)``: the step's newest run
    on the plan's GPU, which replaces the model: a tenth more than its time when it ended, half again
    its budget (at least the model) when the budget stopped it, so that a plan that does not fit
    says so."""
    out = []
    for step in STEPS:
        model, seen = step.estimate(), measured(step.name)
        if seen is None:
            est = model
        elif seen.ended:
            est = Estimate(1.1 * seen.seconds, f"measured on the GPU before: {seen.seconds:.0f} s, + 10%")
        else:
            s = max(1.5 * seen.seconds, model.seconds)
            est = Estimate(s, f"stopped by its budget of {seen.seconds:.0f} s on the GPU before: at least {s:.0f} s")
        out.append(PlannedStep(step, est, seen is not None, step.budget_s(est.seconds)))
    return out


def total_s(plan: list[PlannedStep]) -> float:
    """Seconds of the command's clock the plan takes before its deadline: the suite's start and every step."""
    return lead("suite_start_s") + sum(p.estimate.seconds for p in plan)
