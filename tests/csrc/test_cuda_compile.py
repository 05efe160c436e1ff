"""The CUDA side of csrc/ compiles with this machine's nvcc (compile only; nothing runs).

A CPU machine with nvcc catches syntax and type errors in the CUDA kernel and in the CUDA
branch of the bindings before a GPU build does. Skipped, with the reason, where nvcc (or a C++
compiler, for the bindings) is absent.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
# The GPU generations the wheels target (setup.py's default TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX").
ARCHS = ("80", "90")
TIMEOUT_S = 120
# The language standard torch's extension builds use (torch >= 2.10 headers need C++20).
CXX_STD = "c++20"


def _nvcc() -> str:
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )
    if nvcc is None or not os.path.exists(nvcc):
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
