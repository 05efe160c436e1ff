"""Registers, shared memory, stack and spills of every instantiation of the CUDA row pass.

Compiles csrc/cuda/row_pass_kernel.cu as the extension build does (setup.py's and torch's nvcc
flags) for sm_80 and sm_90 with ``nvcc -Xptxas -v``: compile only, no GPU needed. Per kernel
instantiation (base dtype T, teacher dtype TT, gradient dtype G: float32 for float16 bases,
else T) and architecture it records what ptxas reports
and the most threads per block the launcher uses. That is ``kMaxThreads<T>`` (one block per
row) or ``kOnChipThreads<T>`` (the on-chip kernel, sm_90 only: its sm_80 copy is a trap) in the
source, both the cap of ``threads_for`` and the kernel's ``__launch_bounds__``, read back from
the compiled PTX (``.maxntid``). A block launches only if registers x threads <= 65536, the
registers of one SM on both architectures. The on-chip kernel's shared memory here is its
static part; its slice of the base row is dynamic (``launch.on_chip_slice_bytes``).

    python -m benchmarks.cuda_resources            # writes benchmarks/results/aot_cuda_kernels.json
    python -m benchmarks.cuda_resources --check    # compares a fresh report with that file

tests/csrc/test_cuda_compile.py runs the same compile and asserts 0 spills, that every block
fits, and that the committed JSON agrees with the fresh report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._util import REPO_ROOT, RESULTS_DIR, now_iso, today, write_json

SOURCE = Path("csrc") / "cuda" / "row_pass_kernel.cu"
OUT = RESULTS_DIR / "aot_cuda_kernels.json"
# The GPU generations the wheels target (setup.py's default TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX").
ARCHS = ("80", "90")
# The language standard torch's extension builds use (torch >= 2.10 headers need C++20).
CXX_STD = "c++20"
# setup.py's nvcc flags for the extension (CUDAExtension's extra_compile_args["nvcc"]).
BUILD_FLAGS = ("-O3", "-DNLFT_WITH_CUDA", "-lineinfo")
# Registers of one SM (and the most one block may hold) on sm_80 and sm_90.
REGISTERS_PER_SM = 65536
# The hardware's block size limit: what the launcher may ask for when a kernel has no bound.
MAX_BLOCK = 1024
TIMEOUT_S = 300
# C++ element types of the kernels' template arguments -> torch dtype names.
DTYPES = {"float": "float32", "double": "float64", "__nv_bfloat16": "bfloat16", "__half": "float16"}
# What a fresh report must agree on with the committed one (same nvcc).
COMPARED = (
    "registers",
    "smem_bytes",
    "stack_bytes",
    "spill_store_bytes",
    "spill_load_bytes",
    "max_threads_per_block",
)


def find_nvcc() -> str | None:
    """nvcc on PATH or in CUDA_HOME, or None."""
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    return nvcc if nvcc and os.path.exists(nvcc) else None


def find_demangler(nvcc: str) -> str | None:
    """cu++filt next to nvcc, else c++filt (binutils): both read Itanium-mangled names."""
    beside = Path(nvcc).resolve().parent / "cu++filt"
    return str(beside) if beside.exists() else shutil.which("cu++filt") or shutil.which("c++filt")


def nvcc_version(nvcc: str) -> str:
    """'13.0.88' from ``nvcc --version`` ("... release 13.0, V13.0.88")."""
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"release [\d.]+, V([\d.]+)", text)
    return found.group(1) if found else text.strip().splitlines()[-1]


def torch_nvcc_flags() -> list[str]:
    """The flags torch's CUDAExtension adds to every nvcc call (half-operator macros etc.)."""
    from torch.utils import cpp_extension

    return list(cpp_extension.COMMON_NVCC_FLAGS)


def compile_command(nvcc: str, workdir: Path) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    return [
        nvcc,
        "-c",
        *BUILD_FLAGS,
        *torch_nvcc_flags(),
        f"-std={CXX_STD}",
        *gencode,
        "-Xptxas",
        "-v",
        "--keep",
        "--keep-dir",
        str(workdir),
        str(SOURCE),
        "-o",
        str(workdir / "row_pass_kernel.o"),
    ]


def parse_ptxas(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(mangled entry, 'sm_XX'): resources} from ``-Xptxas -v`` output.

    ptxas prints, per entry function: "Compiling entry function 'NAME' for 'sm_XX'", then
    "N bytes stack frame, N bytes spill stores, N bytes spill loads" and "Used N registers, ...,
    N bytes smem, ..." (smem absent when 0).
    """
    found: dict[tuple[str, str], dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line)
        if entry:
            current = found.setdefault((entry.group(1), entry.group(2)), {"smem_bytes": 0})
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            current["stack_bytes"], current["spill_store_bytes"], current["spill_load_bytes"] = map(int, frame.groups())
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current["registers"] = int(used.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem_bytes"] = int(smem.group(1)) if smem else 0
            current = None
    return found


def parse_maxntid(ptx: str) -> dict[str, int | None]:
    """{mangled entry: threads of its ``.maxntid`` (the __launch_bounds__), or None} of a PTX file."""
    bounds: dict[str, int | None] = {}
    for chunk in ptx.split(".entry ")[1:]:
        name = chunk.split("(", 1)[0].strip()
        header = chunk.split("{", 1)[0]  # parameters and performance directives
        found = re.search(r"\.maxntid\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?", header)
        bounds[name] = (
            None if found is None else int(found.group(1)) * int(found.group(2) or 1) * int(found.group(3) or 1)
        )
    return bounds


def demangle(names: list[str], demangler: str) -> dict[str, str]:
    done = subprocess.run([demangler], input="\n".join(names) + "\n", capture_output=True, text=True, check=True)
    return dict(zip(names, done.stdout.splitlines(), strict=True))


def describe(demangled: str) -> tuple[str, str, str, str]:
    """(kernel with its template arguments, base dtype, teacher dtype, gradient dtype) of a
    demangled entry such as
    ``void nlft::cuda::(anonymous namespace)::row_pass_kernel<__half, float, float>(nlft::RowPass)``."""
    found = re.search(r"(\w+)<([^<>]+)>\(", demangled)
    if found is None:
        raise ValueError(f"not a template kernel: {demangled}")
    args = [a.strip() for a in found.group(2).split(",")]
    if len(args) != 3 or any(a not in DTYPES for a in args):
        raise ValueError(f"unexpected template arguments {args} in {demangled}")
    return f"{found.group(1)}<{', '.join(args)}>", *(DTYPES[a] for a in args)


def report(nvcc: str) -> dict:
    """Compile the kernel and return the report (a fresh temporary folder for nvcc's files)."""
    demangler = find_demangler(nvcc)
    if demangler is None:
        raise RuntimeError("neither cu++filt nor c++filt (binutils) is found: cannot name the kernels' dtypes")
    with tempfile.TemporaryDirectory(prefix="nlft_cuda_resources_") as tmp:
        workdir = Path(tmp)
        cmd = compile_command(nvcc, workdir)
        done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
        resources = parse_ptxas(done.stdout + done.stderr)
        bounds = {}
        for arch in ARCHS:
            ptx = workdir / f"{SOURCE.stem}.compute_{arch}.ptx"
            bounds[f"sm_{arch}"] = parse_maxntid(ptx.read_text())
    names = demangle(sorted({name for name, _ in resources}), demangler)
    variants = []
    for (name, arch), res in resources.items():
        kernel, base, teacher, grad = describe(names[name])
        bound = bounds[arch].get(name)
        threads = bound if bound is not None else MAX_BLOCK
        variants.append(
            {
                "arch": arch,
                "kernel": kernel,
                "base_dtype": base,
                "teacher_dtype": teacher,
                "grad_dtype": grad,
                "registers": res["registers"],
                "smem_bytes": res["smem_bytes"],
                "stack_bytes": res["stack_bytes"],
                "spill_store_bytes": res["spill_store_bytes"],
                "spill_load_bytes": res["spill_load_bytes"],
                "launch_bounds": bound,
                "max_threads_per_block": threads,
                "registers_per_block": res["registers"] * threads,
            }
        )
    variants.sort(key=lambda v: (v["arch"], v["base_dtype"], v["teacher_dtype"], v["grad_dtype"]))
    command = " ".join(["nvcc", *cmd[1:]]).replace(str(workdir), "$TMP")
    return {
        "what": "per-instantiation resources of the CUDA row pass (csrc/cuda/row_pass_kernel.cu), from ptxas",
        "fields": {
            "base_dtype, teacher_dtype, grad_dtype": "the kernel's template arguments T, TT, G: base logits, "
            "teacher logits and gradient rows (float32 for float16 base logits, else the base dtype)",
            "registers, smem_bytes, stack_bytes, spill_*_bytes": "as ptxas -v reports them, per thread / per block",
            "launch_bounds": "threads of the kernel's __launch_bounds__ (PTX .maxntid), null without one",
            "max_threads_per_block": "the most threads per block the launcher (threads_for) uses: kMaxThreads<T> "
            "(row_pass_kernel) or kOnChipThreads<T> (row_pass_on_chip_kernel), the same constant as the launch "
            "bound (the hardware limit 1024 where a kernel has none)",
            "smem_bytes of row_pass_on_chip_kernel": "static shared memory only; each block also holds its slice "
            "of the base row, dynamic (nlft_kernels.ops.launch.on_chip_slice_bytes)",
            "registers_per_block": f"registers x max_threads_per_block; a block launches only at <= {REGISTERS_PER_SM}",
        },
        "source": SOURCE.as_posix(),
        "nvcc": nvcc_version(nvcc),
        "command": command,
        "registers_per_sm": REGISTERS_PER_SM,
        "date": today(),
        "created": now_iso(),
        "variants": variants,
    }


def problems(rep: dict) -> list[str]:
    """What keeps a variant from launching as the launcher launches it, or spills."""
    out = []
    for v in rep["variants"]:
        what = f"{v['arch']} {v['kernel']}"
        if v["spill_store_bytes"] or v["spill_load_bytes"]:
            out.append(f"{what}: spills {v['spill_store_bytes']} B stored, {v['spill_load_bytes']} B loaded")
        if v["registers_per_block"] > REGISTERS_PER_SM:
            out.append(
                f"{what}: {v['registers']} registers x {v['max_threads_per_block']} threads = "
                f"{v['registers_per_block']} > {REGISTERS_PER_SM}: the launcher's largest block cannot launch"
            )
    return out


def differences(committed: dict, fresh: dict) -> list[str]:
    """How a fresh report differs from a committed one: the variants always, their figures when
    both come from the same nvcc (another nvcc allocates registers differently)."""
    key = lambda v: (v["arch"], v["kernel"])  # noqa: E731
    old, new = {key(v): v for v in committed["variants"]}, {key(v): v for v in fresh["variants"]}
    out = [f"{k} only in the committed report" for k in sorted(old.keys() - new.keys())]
    out += [f"{k} only in the fresh report" for k in sorted(new.keys() - old.keys())]
    if committed["nvcc"] != fresh["nvcc"]:
        return out
    for k in sorted(old.keys() & new.keys()):
        for field in COMPARED:
            if old[k][field] != new[k][field]:
                out.append(f"{k} {field}: committed {old[k][field]}, fresh {new[k][field]}")
    return out


def table(rep: dict) -> str:
    rows = [
        "| arch | kernel | registers | smem B | stack B | spill st/ld B | max threads | registers x threads |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in rep["variants"]:
        rows.append(
            f"| {v['arch']} | `{v['kernel']}` | {v['registers']} | {v['smem_bytes']} | {v['stack_bytes']} | "
            f"{v['spill_store_bytes']}/{v['spill_load_bytes']} | {v['max_threads_per_block']} | "
            f"{v['registers_per_block']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (no CUDA toolkit on PATH or in CUDA_HOME)", file=sys.stderr)
        return 2
    rep = report(nvcc)
    print(f"nvcc {rep['nvcc']}: {rep['command']}\n\n{table(rep)}\n")
    bad = problems(rep)
    for line in bad:
        print(f"problem: {line}", file=sys.stderr)
    if args.check:
        diff = differences(json.loads(args.out.read_text()), rep)
        for line in diff:
            print(f"differs: {line}", file=sys.stderr)
        print(f"{args.out}: {'stale' if diff else 'agrees with this compile'}")
        return 1 if diff or bad else 0
    print(f"wrote {write_json(args.out, rep)}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
