"""The CUDA side of csrc/ compiles with this machine's nvcc (compile only; nothing runs).

A CPU machine with nvcc catches syntax and type errors in the CUDA kernel and in the CUDA
branch of the bindings before a GPU build does, and what ptxas allocates for each kernel:
no spills, and registers that let the largest block the launcher asks for launch.
Skipped, with the reason, where nvcc (or a C++ compiler, for the bindings) is absent.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from benchmarks import cuda_resources
from benchmarks.cuda_resources import ARCHS, CXX_STD, REGISTERS_PER_SM

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
TIMEOUT_S = 120
# The (base, teacher, gradient) dtypes launch_base can launch: teachers in the base dtype or the
# accumulator's (float64 for float64 logits, else float32); gradient rows in float32 for float16
# base logits, else in the base dtype (nlft::grad_dtype_for, as nlft_kernels.ops.launch.grad_dtype).
ACCUMULATOR = {"float32": "float32", "float64": "float64", "bfloat16": "float32", "float16": "float32"}
LAUNCHED = {
    (base, teacher, "float32" if base == "float16" else base)
    for base, acc in ACCUMULATOR.items()
    for teacher in (base, acc)
}


# The kernels of row_pass_kernel.cu, each instantiated for every LAUNCHED dtype triple: one block
# per row, and the on-chip clusters (blocks_per_row > 0).
KERNELS = ("row_pass_kernel", "row_pass_on_chip_kernel")


def _nvcc() -> str:
    nvcc = cuda_resources.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit on PATH or in CUDA_HOME): the CUDA source is not compiled here")
    return nvcc


def _cuda_includes(nvcc: str) -> list[str]:
    """The CUDA toolkit's include folders, as nvcc itself passes them (its dry run's INCLUDES)."""
    dry = subprocess.run(
        [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True
    )
    found = re.findall(r'INCLUDES="(?:-I|-isystem)"?\s*"?([^"]+)"', dry.stdout + dry.stderr)
    return list(dict.fromkeys(path.strip() for path in found))


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def test_cuda_kernel_compiles_for_sm80_and_sm90(tmp_path):
    """Every dtype instantiation of row_pass_kernel.cu, warnings as errors."""
    nvcc = _nvcc()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    _run(
        [
            nvcc,
            "-c",
            "-O3",
            f"-std={CXX_STD}",
            *gencode,
            "--Werror",
            "all-warnings",
            "-Xcompiler",
            "-Wall",
            str(CSRC / "cuda" / "row_pass_kernel.cu"),
            "-o",
            str(tmp_path / "row_pass_kernel.o"),
        ]
    )
    assert (tmp_path / "row_pass_kernel.o").stat().st_size > 0


def test_bindings_compile_with_cuda(tmp_path):
    """bindings.cpp with NLFT_WITH_CUDA (the CUDA guard, stream and launch), syntax and types only.

    The CPU torch wheel ships torch's CUDA headers but not the one CMake generates for them
    (c10/cuda/impl/cuda_cmake_macros.h); a stand-in with its content for a shared-library build
    is put on the include path when it is missing.
    """
    nvcc = _nvcc()
    cxx = cpp_extension.get_cxx_compiler()
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx!r} not on PATH)")
    cuda_includes = _cuda_includes(nvcc)
    if not any(Path(d, "cuda_runtime_api.h").exists() for d in cuda_includes):
        pytest.skip(f"nvcc's include folders {cuda_includes} hold no cuda_runtime_api.h")
    includes = [*cpp_extension.include_paths(), *cuda_includes]
    if not any(Path(d, "c10/cuda/impl/cuda_cmake_macros.h").exists() for d in includes):
        stub = tmp_path / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(tmp_path / "include"))
    python_include = subprocess.run(
        [sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    _run(
        [
            cxx,
            f"-std={CXX_STD}",
            "-fsyntax-only",
            "-Wall",
            "-Werror",
            "-DNLFT_WITH_CUDA",
            "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            *(arg for d in includes for arg in ("-isystem", d)),
            "-isystem",
            python_include,
            str(CSRC / "bindings.cpp"),
        ]
    )


@pytest.fixture(scope="module")
def fresh_report() -> dict:
    """benchmarks/cuda_resources.py's report of this checkout's kernel (one nvcc -Xptxas -v compile)."""
    nvcc = _nvcc()
    if cuda_resources.find_demangler(nvcc) is None:
        pytest.skip("neither cu++filt nor c++filt (binutils) is found: the kernels cannot be named")
    return cuda_resources.report(nvcc)


def test_every_cuda_kernel_launches_the_largest_block_without_spills(fresh_report):
    """Per instantiation and architecture: 0 spill bytes, and registers x the most threads the
    launcher gives a block (kMaxThreads<T> or kOnChipThreads<T>, which are also the
    __launch_bounds__) <= 65536, the registers of an SM; else that launch fails with "too many
    resources requested"."""
    variants = fresh_report["variants"]
    found = {
        (v["arch"], v["kernel"].split("<")[0], v["base_dtype"], v["teacher_dtype"], v["grad_dtype"]) for v in variants
    }
    assert found == {(f"sm_{a}", k, *dtypes) for a in ARCHS for k in KERNELS for dtypes in LAUNCHED}
    for v in variants:
        what = f"{v['arch']} {v['kernel']}"
        assert v["spill_store_bytes"] == 0 and v["spill_load_bytes"] == 0, f"{what} spills: {v}"
        assert v["launch_bounds"] == v["max_threads_per_block"], f"{what} has no __launch_bounds__: {v}"
        assert v["registers"] * v["max_threads_per_block"] <= REGISTERS_PER_SM, f"{what} cannot launch: {v}"
    assert not cuda_resources.problems(fresh_report)


def test_committed_resource_report_is_current(fresh_report):
    """benchmarks/results/aot_cuda_kernels.json (the README's source) agrees with this compile:
    the same variants and, with the same nvcc, the same registers, smem, stack and spills."""
    committed = json.loads(cuda_resources.OUT.read_text())
    diff = cuda_resources.differences(committed, fresh_report)
    assert not diff, f"{cuda_resources.OUT.name} is stale (python -m benchmarks.cuda_resources): {diff}"
    if committed["nvcc"] != fresh_report["nvcc"]:
        pytest.skip(f"figures compared with nvcc {committed['nvcc']} only; this is nvcc {fresh_report['nvcc']}")


# ptxas -v and PTX as nvcc 13.0 writes them (trimmed): an entry with a spill, one without smem.
_PTXAS = """\
ptxas info    : Compiling entry function '_ZN4nlft4cuda15row_pass_kernelIddEEvNS_7RowPassE' for 'sm_90'
ptxas info    : Function properties for _ZN4nlft4cuda15row_pass_kernelIddEEvNS_7RowPassE
    32 bytes stack frame, 244 bytes spill stores, 240 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 32 bytes cumulative stack size, 544 bytes smem
ptxas info    : Compile time = 418.474 ms
ptxas info    : Compiling entry function '_ZN4nlft4cuda15row_pass_kernelI6__halffEEvNS_7RowPassE' for 'sm_80'
ptxas info    : Function properties for _ZN4nlft4cuda15row_pass_kernelI6__halffEEvNS_7RowPassE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 600 bytes cmem[0]
"""
_PTX = """\
.entry _ZN4nlft4cuda15row_pass_kernelIffEEvNS_7RowPassE(
\t.param .align 8 .b8 _ZN4nlft4cuda15row_pass_kernelIffEEvNS_7RowPassE_param_0[248]
)
.maxntid 512, 1, 1
{
\tret;
}
.entry _ZN4nlft4cuda15row_pass_kernelIddEEvNS_7RowPassE(
\t.param .align 8 .b8 _ZN4nlft4cuda15row_pass_kernelIddEEvNS_7RowPassE_param_0[248]
)
{
\t// .maxntid in the body is no bound
}
"""


def test_resource_report_parsers():
    """The parsing of benchmarks/cuda_resources.py, without nvcc (its output, recorded)."""
    found = cuda_resources.parse_ptxas(_PTXAS)
    assert found == {
        ("_ZN4nlft4cuda15row_pass_kernelIddEEvNS_7RowPassE", "sm_90"): {
            "smem_bytes": 544,
            "stack_bytes": 32,
            "spill_store_bytes": 244,
            "spill_load_bytes": 240,
            "registers": 64,
        },
        ("_ZN4nlft4cuda15row_pass_kernelI6__halffEEvNS_7RowPassE", "sm_80"): {
            "smem_bytes": 0,
            "stack_bytes": 0,
            "spill_store_bytes": 0,
            "spill_load_bytes": 0,
            "registers": 32,
        },
    }
    assert cuda_resources.parse_maxntid(_PTX) == {
        "_ZN4nlft4cuda15row_pass_kernelIffEEvNS_7RowPassE": 512,
        "_ZN4nlft4cuda15row_pass_kernelIddEEvNS_7RowPassE": None,
    }
    demangled = "void nlft::cuda::(anonymous namespace)::row_pass_kernel<__half, __half, float>(nlft::RowPass)"
    assert cuda_resources.describe(demangled) == (
        "row_pass_kernel<__half, __half, float>",
        "float16",
        "float16",
        "float32",
    )
    with pytest.raises(ValueError, match="unexpected template arguments"):
        cuda_resources.describe("void nlft::cuda::(anonymous namespace)::row_pass_kernel<__half, float>(nlft::RowPass)")
    report = {
        "variants": [
            {
                "arch": "sm_90",
                "kernel": "k<double, double>",
                "registers": 94,
                "max_threads_per_block": 1024,
                "registers_per_block": 94 * 1024,
                "spill_store_bytes": 0,
                "spill_load_bytes": 0,
            }
        ]
    }
    assert [p.split(":")[0] for p in cuda_resources.problems(report)] == ["sm_90 k<double, double>"]
