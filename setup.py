"""Build and install nlft-kernels.

The Python package always installs. The optional compiled extension ``nlft_kernels._C`` (the
fused NLFT row pass: a C++ CPU kernel, and a CUDA kernel when the installed torch has CUDA and
nvcc is found) is built with ninja through ``torch.utils.cpp_extension``, against the torch
that runs the build. A build that cannot happen or fails prints why and installs the
pure-Python package; the reason is also written to ``nlft_kernels/_build_info.json``, which
``nlft_kernels.backends()`` reports.

The extension is built against the torch already installed in the environment being installed
into (pyproject.toml's build requirements hold no torch, so that pip never builds against a
second, different torch whose ABI would not load):
  pip install torch && pip install .
  pip install torch ninja && pip install --no-build-isolation .   # the same, without pip's build env
  python setup.py build_ext --inplace                              # developers: _C next to the sources
pip's isolated build environment hides that torch; setup.py then imports it from the
interpreter's own site-packages. Without torch installed first, the pure-Python package installs.

Environment switches:
  NLFT_SKIP_CUDA_BUILD=1   build only the CPU kernel, even where CUDA could be built.
  NLFT_FORCE_CUDA=1        the CUDA kernel is required: stop with an error when it cannot be
                           built, instead of falling back.
  MAX_JOBS=N               parallel compile jobs (ninja), as for every torch extension.
  TORCH_CUDA_ARCH_LIST     GPU architectures of the CUDA kernel; default "8.0;9.0+PTX".
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import sysconfig
import traceback
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = "csrc"
EXT_NAME = "nlft_kernels._C"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# Compiled once per instruction set with these flags (as torch compiles its own kernels);
# csrc/cpu/row_pass_dispatch.cpp picks one at run time. The portable copy comes first so that
# the linker keeps its copies of the inline functions the three objects share.
CPU_KERNEL = f"{CSRC}/cpu/row_pass_kernel.cpp"
# The extension's own sources without CUDA (the CPU kernel's objects are added per instruction set).
CPU_SOURCES = (f"{CSRC}/bindings.cpp", f"{CSRC}/cpu/row_pass_dispatch.cpp")
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
CPU_CAPABILITIES = {"DEFAULT": []}
if X86:
    CPU_CAPABILITIES |= {
        "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
        "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    }
# -fopenmp: at::parallel_for is inline OpenMP in torch's headers; without it the rows run on one
# thread. The extension then shares the libgomp.so.1 that torch has already loaded.
CXX_FLAGS = ["-O3", "-fopenmp"] + (["-DNLFT_X86_KERNELS"] if X86 else [])
BUILD_INFO = "nlft_kernels/_build_info.json"
NO_TORCH_HINT = "for the compiled kernels install torch first: pip install torch && pip install ."
# What this build decided, written to BUILD_INFO next to the package for backends() to report.
build_info: dict = {"extension": "not built", "reason": "", "torch": None, "cuda": False}


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _say(message: str) -> None:
    print(f"nlft-kernels: {message}", file=sys.stderr, flush=True)


def _write_build_info(package_dir: str) -> None:
    path = Path(package_dir) / Path(BUILD_INFO).name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_info, indent=2) + "\n")


def _skip(reason: str) -> tuple[list, dict]:
    build_info["reason"] = reason
    _say(f"installing the pure-Python package without nlft_kernels._C: {reason}")
    return [], {"build_py": BuildPyWithInfo}


class BuildPyWithInfo(build_py):
    """build_py that also writes BUILD_INFO (what this build decided) into the package."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            _write_build_info(os.path.join(self.build_lib, "nlft_kernels"))


def _extensions() -> tuple[list, dict]:
    """([the nlft_kernels._C extension] or [], cmdclass); says why a part is left out."""
    force_cuda, skip_cuda = _flag("NLFT_FORCE_CUDA"), _flag("NLFT_SKIP_CUDA_BUILD")
    if force_cuda and skip_cuda:
        raise SystemExit("nlft-kernels: NLFT_FORCE_CUDA=1 and NLFT_SKIP_CUDA_BUILD=1 contradict each other")
    try:
        torch = _import_target_torch()
        from torch.utils import cpp_extension
    except ImportError as err:
        if force_cuda:
            raise SystemExit(f"nlft-kernels: NLFT_FORCE_CUDA=1 but torch cannot be imported ({err})") from err
        return _skip(f"torch is not installed in {sysconfig.get_paths()['purelib']} ({err}); {NO_TORCH_HINT}")
    build_info["torch"] = torch.__version__
    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler.split()[0] if compiler.strip() else "c++") is None:
        if force_cuda:
            raise SystemExit(f"nlft-kernels: NLFT_FORCE_CUDA=1 but the C++ compiler {compiler!r} is not found")
        return _skip(f"no C++ compiler: {compiler!r} is not on PATH (set CXX, or install g++)")

    with_cuda, why_not = _cuda_wanted(torch, cpp_extension, skip_cuda)
    if not with_cuda:
        if force_cuda:
            raise SystemExit(f"nlft-kernels: NLFT_FORCE_CUDA=1 but the CUDA kernel cannot be built: {why_not}")
        _say(f"building the CPU kernel only: {why_not}")
    sources = list(CPU_SOURCES)
    cxx = list(CXX_FLAGS)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        _say(f"building the CPU and CUDA kernels (TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        sources.append(f"{CSRC}/cuda/row_pass_kernel.cu")
        cxx.append("-DNLFT_WITH_CUDA")
        ext = cpp_extension.CUDAExtension(
            EXT_NAME,
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-DNLFT_WITH_CUDA", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = _cpu_extension(cpp_extension)
    build_info["cuda"] = with_cuda
    build_info["reason"] = "" if with_cuda else f"CPU kernel only: {why_not}"
    # A CUDA build that fails falls back to the CPU kernel, not to no extension at all.
    fallback = _cpu_extension(cpp_extension) if with_cuda and not force_cuda else None
    build_ext = _optional_build_ext(cpp_extension.BuildExtension, force_cuda, fallback)
    return [ext], {"build_ext": build_ext, "build_py": BuildPyWithInfo}


def _cpu_extension(cpp_extension):
    """The extension with the C++ CPU kernel only."""
    return cpp_extension.CppExtension(
        EXT_NAME, list(CPU_SOURCES), extra_compile_args={"cxx": list(CXX_FLAGS)}, extra_link_args=["-fopenmp"]
    )


def _import_target_torch():
    """The torch of the environment this package is installed into.

    pip's isolated build environment drops the interpreter's site-packages from ``sys.path``
    (sysconfig still names them); the extension must be compiled against the torch that will
    import it, which lives there, so look there after the build environment's own paths.
    """
    try:
        import torch
    except ImportError:
        for key in ("purelib", "platlib"):
            path = sysconfig.get_paths()[key]
            if path not in sys.path and os.path.isdir(path):
                sys.path.append(path)
        import torch
    return torch


def _cuda_wanted(torch, cpp_extension, skip: bool) -> tuple[bool, str]:
    """(build the CUDA kernel?, why not)."""
    if skip:
        return False, "NLFT_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is built without CUDA"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    home = _cuda_toolkit(cpp_extension.CUDA_HOME)
    if home is None:
        where = cpp_extension.CUDA_HOME
        return False, f"no CUDA toolkit headers (include/cuda_runtime_api.h) under {where}; set CUDA_HOME"
    # Every later use (include paths, nvcc, libraries) reads this module global.
    cpp_extension.CUDA_HOME = home
    return True, ""


def _cuda_toolkit(home: str) -> str | None:
    """The toolkit folder that holds the headers: ``home``, else (when no CUDA_HOME was set) where
    the nvcc found on PATH really lives, else /usr/local/cuda. torch takes CUDA_HOME as two levels
    above ``which nvcc``; with nvcc linked or wrapped in /usr/local/bin that is /usr/local, which
    has no CUDA headers (seen on a machine whose toolkit is /usr/local/cuda-13.0)."""
    candidates = [home]
    nvcc = shutil.which("nvcc")
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        if nvcc:
            candidates.append(str(Path(nvcc).resolve().parent.parent))
        candidates.append("/usr/local/cuda")
    for candidate in candidates:
        if (Path(candidate) / "include" / "cuda_runtime_api.h").is_file():
            return candidate
    return None


def _optional_build_ext(base, required: bool, cpu_fallback=None):
    """torch's BuildExtension that compiles the CPU kernel once per instruction set and, unless
    ``required``, reports a failed build and carries on: with ``cpu_fallback`` (the CPU-only
    extension, after a failed CUDA build), else without the extension."""

    class OptionalBuildExtension(base):
        def build_extensions(self) -> None:
            # torch checks the compiler here, before any build_extension call: a missing or
            # broken compiler fails in this method.
            self.nlft_built = False
            try:
                super().build_extensions()
            except Exception as err:
                if required:
                    raise
                traceback.print_exc()
                if cpu_fallback is not None and self._build_cpu_only(err):
                    self.nlft_built = True
                else:
                    build_info["extension"] = "not built"
                    build_info["reason"] = f"the build failed ({type(err).__name__}: {str(err)[-500:]})"
                    _say(
                        f"the optional extension {EXT_NAME} did not build ({type(err).__name__}: {err}); "
                        "installing the pure-Python package (backend='torch' on CPU, 'triton' on GPU). "
                        "Fix the cause and reinstall to get the compiled kernels."
                    )
            else:
                self.nlft_built = True
            if self.nlft_built:
                build_info["extension"] = "built"
                build_info["cpu_capabilities"] = list(CPU_CAPABILITIES)
            _write_build_info(os.path.dirname(self.get_ext_fullpath(EXT_NAME)))

        def _build_cpu_only(self, cuda_err: Exception) -> bool:
            """After a failed CUDA build: build the CPU kernel alone; True when that worked (the
            reason recorded says why the CUDA kernel is missing)."""
            why = f"the CUDA kernel did not build ({type(cuda_err).__name__}: {str(cuda_err)[-300:]})"
            _say(f"{why}; building the CPU kernel only")
            # The same Extension object (setuptools has finalized it), given the CPU-only build's parts.
            for ext in self.extensions:
                for attr in ("sources", "include_dirs", "library_dirs", "libraries", "extra_compile_args",
                             "extra_link_args", "extra_objects"):  # fmt: skip
                    setattr(ext, attr, getattr(cpu_fallback, attr))
            try:
                super().build_extensions()
            except Exception:
                traceback.print_exc()
                return False
            build_info.update(cuda=False, reason=f"CPU kernel only: {why}")
            return True

        def copy_extensions_to_source(self) -> None:
            # In-place and editable builds: nothing to copy after a failed optional build.
            if getattr(self, "nlft_built", False):
                super().copy_extensions_to_source()
            _write_build_info(os.path.dirname(self.get_ext_fullpath(EXT_NAME)))

        def build_extension(self, ext) -> None:
            ext.extra_objects = self._cpu_kernel_objects(ext) + list(ext.extra_objects or [])
            super().build_extension(ext)

        def _cpu_kernel_objects(self, ext) -> list[str]:
            objects = []
            for capability, flags in CPU_CAPABILITIES.items():
                objects += self.compiler.compile(
                    [CPU_KERNEL],
                    output_dir=os.path.join(self.build_temp, capability),
                    include_dirs=ext.include_dirs,
                    extra_postargs={"cxx": CXX_FLAGS + flags + [f"-DCPU_CAPABILITY={capability}"]},
                )
            return objects

        def get_outputs(self) -> list[str]:
            # A failed optional build leaves no file to install.
            return [path for path in super().get_outputs() if os.path.exists(path)]

    return OptionalBuildExtension


ext_modules, cmdclass = _extensions()

# The package's metadata, dependencies, extras, console script and package data are in
# pyproject.toml's [project]; this file only builds the optional extension.
setup(ext_modules=ext_modules, cmdclass=cmdclass)
