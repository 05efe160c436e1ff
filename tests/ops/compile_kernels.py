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

Run as a script without TRITON_INTERPRET:
  python -m tests.ops.compile_kernels                # compile, check 0 spills, print a summary
  python -m tests.ops.compile_kernels --write FILE   # also write the resources as JSON
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

# The kernels above were decorated as compiled JIT functions (TRITON_INTERPRET unset at import).
# The package only lets backend="triton" take CPU tensors when Triton interprets; from here on
# it may, and the stand-in driver below makes sure nothing runs.
os.environ["TRITON_INTERPRET"] = "1"

TARGETS = (GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32))
VOCABS = (32000, 50257, 128256, 151936, 256000)
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# (batch, steps): T unaligned, T aligned to 16, T = 1 (the JIT specialises sizes too).
SHAPES = ((2, 3), (1, 16), (3, 1))
REGISTERS_PER_SM = 65536


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


def record_launches() -> list[Variant]:
    """Every distinct kernel variant that the package's public functions launch at ``VOCABS``."""
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
    try:
        # The measured entries of the launch table choose their own tiles: compile those too.
        tuned = {bucket for _, bucket, _, _ in launch_module.TUNED}
        for vocab in sorted(set(VOCABS) | tuned):
            for dtype in DTYPES:
                _launch_everything(vocab, dtype)
    finally:
        knobs.runtime.jit_cache_hook = None
        drivers._active = previous
    return list(seen)


def _launch_everything(vocab: int, dtype: torch.dtype) -> None:
    """Call each public entry point that launches a Triton kernel, as a user would."""
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
                    nlft_kernels.nlft_loss(
                        x, labels, correct, standard=std, judge=judge, backend="triton", validate=False
                    )
        x = base.clone().requires_grad_()
        lp = nlft_kernels.token_logprobs(x, labels, backend="triton", validate=False)
        lp.sum().backward()
    flat = torch.randn(4, vocab, generator=g).to(dtype)
    factor = torch.full((4,), 0.5)
    rescale_rows(flat, factor, torch.arange(2), "triton")
    if dtype != torch.float64:
        hidden = torch.randn(2, 3, 16, generator=g).to(dtype).requires_grad_()
        weight = torch.randn(vocab, 16, generator=g).to(dtype).requires_grad_()
        labels = torch.randint(0, vocab, (2, 3), generator=g)
        correct = torch.tensor([True, False])
        std = nlft_kernels.linear_token_logprobs(hidden.detach(), weight.detach(), labels, backend="triton")
        nlft_kernels.nlft_linear_loss(
            hidden, weight, labels, correct, standard=std, judge=std, backend="triton", validate=False
        )


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


def resources(compiled, ptxas_log: str, target: GPUTarget, workdir: Path) -> dict:
    """Registers, stack and local memory of the cubin (cuobjdump), spill bytes (the ptxas log),
    the shared memory the launch asks for and the registers of the launched block."""
    cubin = workdir / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    assert spills, f"no spill line in the ptxas log of {compiled.metadata.name}: {ptxas_log[-500:]}"
    threads = compiled.metadata.num_warps * 32
    registers = int(fields["REG"])
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
    }


# float64 (the gradcheck dtype) divides in IEEE double precision, whose slow path ptxas emits as a
# subroutine: a call frame of 8 bytes and one register saved across the call (4 bytes stored once
# per program and loaded once), seen on sm_80 in the no-gradient three-view kernel whatever the
# warps. That is not register pressure; any other spill, and any spill of a 16/32-bit variant, is.
FP64_CALL_FRAME_BYTES = 8


def check(row: dict) -> list[str]:
    """What would make this variant fail or crawl on a GPU: spills, local memory, a block whose
    registers exceed one SM's."""
    problems = []
    spills = row["spill_store_bytes"] or row["spill_load_bytes"] or row["local_bytes"] or row["stack_bytes"]
    call_frame = (
        "*fp64" in row["pointer_types"].values()
        and row["local_bytes"] == 0
        and max(row["stack_bytes"], row["spill_store_bytes"], row["spill_load_bytes"]) <= FP64_CALL_FRAME_BYTES
    )
    if spills and not call_frame:
        problems.append("spills to local memory")
    if row["registers_per_block"] > REGISTERS_PER_SM:
        problems.append(f"{row['registers']} registers x {row['threads']} threads > {REGISTERS_PER_SM}")
    return problems


def compile_share(worker: int, workers: int) -> list[dict]:
    """Resources of every ``workers``-th (variant, target) from ``worker`` on, in this process."""
    jobs = [(v, t) for v in record_launches() for t in TARGETS][worker::workers]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, target in jobs:
            compiled, log = compile_variant(variant, target)
            row = {**variant.describe(), **resources(compiled, log, target, Path(tmp))}
            rows.append({**row, "problems": check(row)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="write every variant's resources to this JSON file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes")
    args = parser.parse_args(argv)
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        shares = pool.map(compile_share, range(args.jobs), [args.jobs] * args.jobs)
        rows = [row for share in shares for row in share]
    rows.sort(key=lambda r: json.dumps(r, sort_keys=True))
    problems = [f"{r['kernel']} {r['arch']} {r['constexprs']}: {p}" for r in rows for p in r["problems"]]
    variants = len(rows) // len(TARGETS)
    kernels = sorted({row["kernel"] for row in rows})
    print(f"compiled {len(rows)} kernel variants ({variants} launched x {len(TARGETS)} targets) of {kernels}")
    print(f"max registers {max(r['registers'] for r in rows)}, max shared {max(r['shared_bytes'] for r in rows)} B")
    if args.write:
        report = {
            "what": "every Triton kernel variant the package launches at the vocabularies below, "
            "compiled ahead of time by tests/ops/compile_kernels.py",
            "command": "python -m tests.ops.compile_kernels --write " + str(args.write),
            "date": datetime.date.today().isoformat(),
            "triton": triton.__version__,
            "torch": torch.__version__,
            "vocabularies": list(VOCABS),
            "dtypes": [str(d).removeprefix("torch.") for d in DTYPES],
            "variants": rows,
        }
        args.write.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.write}")
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
