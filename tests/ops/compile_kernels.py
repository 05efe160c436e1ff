"""Compile, for real GPUs and without one, exactly the Triton kernel variants the package launches.

The interpreter that runs the kernels in CI accepts code the compiler rejects (tiles that are
not powers of two, globals that are not constexpr, type mismatches between branches), and a
variant is fixed by more than the source: the launch configuration (``ops/launch.py``) and the
JIT's specialisation of each argument (16-byte divisibility of pointers, strides and sizes:
V=50257 rows are not aligned, V=32000 rows are). So this script calls the package's public
functions on CPU tensors at real vocabularies, in every view mode and dtype, and lets Triton's
own JIT bind and specialise each launch as it would on a GPU; a driver with no device stands in
for CUDA, and the JIT's cache hook records the variant instead of launching it. Each distinct
variant is then compiled to a cubin for sm_80 and sm_90, and its resources are read from the
cubin (registers, stack, local memory) and from ptxas (spill bytes).

Each SASS is also read for its static count of block-wide barriers (``bar_sync_count``): the
row kernels reduce across warps once per row, and an sm_90 variant may have at most
``MAX_BAR_SYNC_SM90``.

Run as a script without TRITON_INTERPRET:
  python -m tests.ops.compile_kernels                # compile, check, print a summary
  python -m tests.ops.compile_kernels --write FILE   # also write the resources as FILE's section
                                                     # of the installed Triton (others kept)
  python -m tests.ops.compile_kernels --vocab 128256 --dtype bfloat16 --profile
                                                     # a subset, with each sm_90 SASS loop's
                                                     # instructions, barriers, shuffles, loads
  python -m tests.ops.compile_kernels --list FILE    # only the launched variants, not compiled
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile_kernels must run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import nlft_kernels  # noqa: E402
import nlft_kernels.ops.launch as launch_module  # noqa: E402
from nlft_kernels.ops.stages import rescale_rows  # noqa: E402
from tests.ops.aot_limits import (  # noqa: E402, F401 - the limits and the variants' grid, named once
    DTYPES,
    FP64_CALL_FRAME_BYTES,
    MAX_BAR_SYNC_SM90,
    REGISTERS_PER_SM,
    VOCABS,
    check,
)

# The kernels above were decorated as compiled JIT functions (TRITON_INTERPRET unset at import).
# The package only lets backend="triton" take CPU tensors when Triton interprets; from here on
# it may, and the stand-in driver below makes sure nothing runs.
os.environ["TRITON_INTERPRET"] = "1"

TARGETS = (GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32))
# (batch, steps): T unaligned, T aligned to 16, T = 1 (the JIT specialises sizes too).
SHAPES = ((2, 3), (1, 16), (3, 1))


class _NoDeviceDriver(DriverBase):
    """A CUDA driver with no device: it names the target the JIT specialises for; no launch
    reaches it (the cache hook stops each one after recording it)."""

    def __init__(self, target: GPUTarget):
        self.target = target

    @staticmethod
    def is_active() -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: its function, Triton signature, constexprs, specialisation, options."""

    fn: object
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple

    @property
    def name(self) -> str:
        return self.fn.fn.__name__

    def describe(self) -> dict:
        params = [p.name for p in self.fn.params]
        constexprs = {params[path[0]]: _plain(value) for path, value in self.constexprs}
        aligned = sorted(params[path[0]] for path, attr in self.attrs if "tt.divisibility" in repr(attr))
        return {
            "kernel": self.name,
            "constexprs": constexprs,
            "pointer_types": {k: v for k, v in self.signature if v.startswith("*")},
            "divisible_by_16": aligned,
            **dict(self.options),
        }


def _plain(value):
    return value if isinstance(value, int | float | bool | str) else str(value)


def record_launches(vocabs=VOCABS, dtypes=DTYPES) -> list[Variant]:
    """Every distinct kernel variant that the package's public functions launch at ``vocabs``
    (and the vocabularies of ``TUNED``) in ``dtypes``."""
    seen: dict[Variant, None] = {}

    def hook(*, fn, compile, **_):
        options = tuple(
            (k, compile[k]) for k in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion") if k in compile
        )
        variant = Variant(
            fn=fn.jit_function,
            signature=tuple(compile["signature"].items()),
            constexprs=tuple(sorted(compile["constants"].items())),
            attrs=tuple(sorted((k, tuple(map(tuple, v))) for k, v in compile["configs"][0].items())),
            options=options,
        )
        seen.setdefault(variant, None)
        return True  # recorded: skip the compile and the launch

    drivers = triton.runtime.driver
    previous = drivers._active  # reset_active() would look for a real driver, and find none here
    drivers.set_active(_NoDeviceDriver(TARGETS[-1]))
    knobs.runtime.jit_cache_hook = hook
    # The skipped launches leave their outputs uninitialised: filled with NaN (torch's
    # deterministic mode fills new tensors), a call that checks them fails every time, not by chance.
    deterministic, fill = (
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        # The measured entries of the launch table choose their own tiles: compile those too.
        tuned = {bucket for _, bucket, _, _ in launch_module.TUNED}
        for vocab in sorted(set(vocabs) | tuned):
            for dtype in dtypes:
                _launch_everything(vocab, dtype)
    finally:
        knobs.runtime.jit_cache_hook = None
        drivers._active = previous
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    return list(seen)


def _launch_everything(vocab: int, dtype: torch.dtype) -> None:
    """Call each public entry point that launches a Triton kernel, as a user would: forward and
    backward (float16's gradient is written in backward), in place and not. Every call passes
    ``validate=False``: the recorder skips the launches, so the kernels' outputs are the NaN that
    fills new tensors there, and a check of them (linear_token_logprobs' finite log-probs) fails."""
    g = torch.Generator().manual_seed(vocab)
    for batch, steps in SHAPES:
        base = torch.randn(batch, steps, vocab, generator=g).to(dtype)
        labels = torch.randint(0, vocab, (batch, steps), generator=g)
        logits, logprobs = base.clone(), torch.zeros(batch, steps, dtype=torch.float32)
        for grad in (True, False):
            for std in (logits, logprobs):
                for judge in (logits, logprobs, None):
                    correct = torch.tensor([judge is None or b % 2 == 0 for b in range(batch)])
                    x = base.clone().requires_grad_(grad)
                    loss = nlft_kernels.nlft_loss(
                        x, labels, correct, standard=std, judge=judge, backend="triton", validate=False
                    )
                    if grad:
                        loss.backward(torch.tensor(0.5))  # grad_output != 1: backward's scaling pass
        leaf = base.clone().requires_grad_()
        correct = torch.tensor([b % 2 == 0 for b in range(batch)])
        nlft_kernels.nlft_loss(
            leaf * 1, labels, correct, standard=logits, judge=logits, backend="triton", validate=False,
            inplace_grad=True,
        ).backward()  # fmt: skip
        x = base.clone().requires_grad_()
        lp = nlft_kernels.token_logprobs(x, labels, backend="triton", validate=False)
        lp.sum().backward()
        weights = torch.rand(batch, steps, generator=g)
        for inplace in (False, True):
            leaf = base.clone().requires_grad_()
            nlft_kernels.token_weighted_cross_entropy(
                leaf * 1, labels, weights, backend="triton", validate=False, inplace_grad=inplace
            ).backward()
    flat = torch.randn(4, vocab, generator=g).to(dtype)
    factor = torch.tensor([0.5, 1.0, 0.0, 2.0])
    rescale_rows(flat, factor, "triton")
    if dtype != torch.float64:
        hidden = torch.randn(2, 3, 16, generator=g).to(dtype).requires_grad_()
        weight = torch.randn(vocab, 16, generator=g).to(dtype).requires_grad_()
        labels = torch.randint(0, vocab, (2, 3), generator=g)
        correct = torch.tensor([True, False])
        std = nlft_kernels.linear_token_logprobs(
            hidden.detach(), weight.detach(), labels, backend="triton", validate=False
        )
        nlft_kernels.nlft_linear_loss(
            hidden, weight, labels, correct, standard=std, judge=std, backend="triton", validate=False
        ).backward()
        weights = torch.rand(2, 3, generator=g)
        nlft_kernels.linear_token_weighted_cross_entropy(
            hidden, weight, labels, weights, backend="triton", validate=False
        ).backward()


def compile_variant(variant: Variant, target: GPUTarget):
    """(compiled kernel, the log of the ptxas run that made its cubin: Triton passes -v)."""
    source = ASTSource(
        fn=variant.fn, signature=dict(variant.signature), constexprs=dict(variant.constexprs), attrs=dict(variant.attrs)
    )
    log = io.StringIO()
    # Compiled anew (a cached cubin comes without its ptxas log), with the log printed.
    knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=target, options=dict(variant.options))
    finally:
        knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = False
    return compiled, log.getvalue()


CUDA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# One SASS instruction as ``cuobjdump -sass`` prints it: /*address*/ [@[!]predicate] OPCODE operands ;
_SASS_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", re.M)


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str
    operands: str


def sass(cubin: Path) -> list[Instruction]:
    """The kernel's SASS instructions, in address order (the cubin holds one kernel)."""
    text = subprocess.run([CUDA_BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return [Instruction(int(a, 16), op, args.strip()) for a, op, args in _SASS_INSTRUCTION.findall(text)]


def bar_sync_count(instructions: list[Instruction]) -> int:
    """Static count of block-wide barriers: instructions whose opcode is ``BAR.SYNC`` with any
    modifier (``BAR.SYNC``, ``BAR.SYNC.DEFER_BLOCKING``: what ``__syncthreads`` and Triton's
    ``gpu.barrier`` become), predicated or not, once per place in the code (not per execution).
    Not counted: ``BAR.ARV``/``BAR.RED`` (not emitted here), ``WARPSYNC`` and ``BSSY``/``BSYNC``
    (convergence of one warp's divergent branches, no wait on other warps)."""
    return sum(1 for i in instructions if i.opcode == "BAR.SYNC" or i.opcode.startswith("BAR.SYNC."))


def loop_profile(instructions: list[Instruction]) -> list[dict]:
    """Every loop of the SASS (a branch back to a lower address: the loop runs from the target
    to the branch), outermost first: instructions, BAR.SYNC, SHFL, MUFU (exp/log), local-memory
    accesses (spills), global loads and stores in its body. Read by ``--profile``; a view of the
    code, not a measurement."""
    loops = []
    for branch in instructions:
        target = re.fullmatch(r"(?:`\()?0x([0-9a-f]+)\)?`?", branch.operands.strip())
        if branch.opcode.startswith("BRA") and target and int(target.group(1), 16) < branch.address:
            start = int(target.group(1), 16)
            body = [i for i in instructions if start <= i.address <= branch.address]
            loops.append(
                {
                    "from": hex(start),
                    "to": hex(branch.address),
                    "instructions": len(body),
                    "bar_sync": bar_sync_count(body),
                    "shfl": sum(i.opcode.startswith("SHFL") for i in body),
                    "mufu": sum(i.opcode.startswith("MUFU") for i in body),
                    "local": sum(i.opcode.startswith(("STL", "LDL")) for i in body),
                    "loads": sorted(i.opcode for i in body if i.opcode.startswith("LDG")),
                    "stores": sorted(i.opcode for i in body if i.opcode.startswith("STG")),
                }
            )
    return sorted(loops, key=lambda loop: (int(loop["from"], 16), -int(loop["to"], 16)))


def resources(compiled, ptxas_log: str, target: GPUTarget, workdir: Path) -> dict:
    """Registers, stack and local memory of the cubin (cuobjdump), spill bytes (the ptxas log),
    the shared memory the launch asks for, the registers of the launched block, the static
    count of block-wide barriers in the SASS (``bar_sync_count``) and its local-memory accesses
    (spills) inside loops."""
    cubin = workdir / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run(
        [CUDA_BIN / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    assert spills, f"no spill line in the ptxas log of {compiled.metadata.name}: {ptxas_log[-500:]}"
    threads = compiled.metadata.num_warps * 32
    registers = int(fields["REG"])
    instructions = sass(cubin)
    return {
        "arch": f"sm_{target.arch}",
        "registers": registers,
        "threads": threads,
        "registers_per_block": registers * threads,
        "shared_bytes": int(compiled.metadata.shared),
        "stack_bytes": int(fields["STACK"]),
        "local_bytes": int(fields["LOCAL"]),
        "spill_store_bytes": int(spills.group(1)),
        "spill_load_bytes": int(spills.group(2)),
        "bar_sync": bar_sync_count(instructions),
        "local_accesses_in_loops": sum(loop["local"] for loop in loop_profile(instructions)),
    }


def compile_share(worker: int, workers: int, vocabs: tuple, dtypes: tuple, profile: bool = False) -> list[dict]:
    """Resources of every ``workers``-th (variant, target) from ``worker`` on, in this process
    (with ``profile``, each row also gets its SASS loops: ``loop_profile``)."""
    jobs = [(v, t) for v in record_launches(vocabs, dtypes) for t in TARGETS][worker::workers]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, target in jobs:
            compiled, log = compile_variant(variant, target)
            row = {**variant.describe(), **resources(compiled, log, target, Path(tmp))}
            row["problems"] = check(row)
            if profile:
                row["loops"] = loop_profile(sass(Path(tmp) / "kernel.cubin"))
            rows.append(row)
    return rows


def section(rows: list[dict], command: str, vocabs, dtypes) -> dict:
    """The report of one Triton version: what was compiled, with what, and every variant."""
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": command,
        "vocabularies": sorted(vocabs),
        "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
        "variants": rows,
    }


def write_section(path: Path, part: dict) -> None:
    """Put ``part`` into the report at ``path`` as the section of its Triton version, keeping the
    sections of other versions (each is written by a run under that version)."""
    report = json.loads(path.read_text()) if path.exists() else {}
    sections = report.get("triton_versions", {})
    sections[part["triton"]] = part
    report = {
        "what": "every Triton kernel variant the package launches, compiled ahead of time by "
        "tests/ops/compile_kernels.py for sm_80 and sm_90 with each Triton version below (one section each): "
        "registers, spills, shared memory and the static BAR.SYNC count of the SASS",
        "triton_versions": dict(sorted(sections.items(), key=lambda kv: _version(kv[0]), reverse=True)),
    }
    path.write_text(json.dumps(report, indent=1) + "\n")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="write the resources as this Triton's section of this JSON file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    parser.add_argument("--vocab", type=int, action="append", help="only these vocabularies (default: VOCABS)")
    parser.add_argument("--dtype", action="append", help="only these dtypes, e.g. bfloat16 (default: DTYPES)")
    parser.add_argument("--profile", action="store_true", help="print each sm_90 variant's SASS loops")
    parser.add_argument("--list", type=Path, help="only record the launched variants (per target) into this JSON")
    args = parser.parse_args(argv)
    vocabs = tuple(args.vocab or VOCABS)
    dtypes = tuple(getattr(torch, name) for name in args.dtype) if args.dtype else DTYPES
    if args.list:
        launched = [{**v.describe(), "arch": f"sm_{t.arch}"} for v in record_launches(vocabs, dtypes) for t in TARGETS]
        args.list.write_text(json.dumps(launched, indent=1) + "\n")
        print(f"recorded {len(launched)} launched variants x targets into {args.list}")
        return 0
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        shares = pool.map(
            compile_share,
            range(args.jobs),
            [args.jobs] * args.jobs,
            [vocabs] * args.jobs,
            [dtypes] * args.jobs,
            [args.profile] * args.jobs,
        )
        rows = [row for share in shares for row in share]
    rows.sort(key=lambda r: json.dumps(r, sort_keys=True))
    problems = [f"{r['kernel']} {r['arch']} {r['constexprs']}: {p}" for r in rows for p in r["problems"]]
    variants = len(rows) // len(TARGETS)
    kernels = sorted({row["kernel"] for row in rows})
    print(
        f"Triton {triton.__version__}: compiled {len(rows)} kernel variants "
        f"({variants} launched x {len(TARGETS)} targets) of {kernels}"
    )
    print(
        f"max registers {max(r['registers'] for r in rows)}, max shared {max(r['shared_bytes'] for r in rows)} B, "
        f"max BAR.SYNC sm_90 {max(r['bar_sync'] for r in rows if r['arch'] == 'sm_90')}"
    )
    if args.profile:
        for r in rows:
            if r["arch"] == "sm_90":
                print(json.dumps({k: r[k] for k in ("kernel", "constexprs", "num_warps", "registers", "bar_sync")}))
                print("  divisible_by_16:", ",".join(r["divisible_by_16"]))
                for loop in r.pop("loops"):
                    print("  loop", json.dumps(loop))
    if args.write:
        command = "python -m tests.ops.compile_kernels --write " + str(args.write)
        command += "".join(f" --vocab {v}" for v in args.vocab or ()) + "".join(
            f" --dtype {d}" for d in args.dtype or ()
        )
        write_section(
            args.write, section([{k: v for k, v in r.items() if k != "loops"} for r in rows], command, vocabs, dtypes)
        )
        print(f"wrote the Triton {triton.__version__} section of {args.write}")
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
