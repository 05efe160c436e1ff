"""Loading the compiled extension ``nlft_kernels._C``: from the package, or from the installed
distribution when tests run from a source checkout; any failure returned as a reason, never
raised, so that ``import nlft_kernels`` never breaks. The backend registry
(:mod:`nlft_kernels.backends`) reports and chooses from it; the extension's ops
(:mod:`nlft_kernels.ops.extension_ops`) call into it. It imports neither.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

# Written by setup.py next to the package: whether the build made _C, why not, and the torch it
# was built against.
BUILD_INFO = "_build_info.json"
REBUILD = "pip install --force-reinstall --no-deps . after torch (or python setup.py build_ext --inplace in a checkout)"


@functools.cache
def extension() -> tuple[ModuleType | None, str]:
    """(``nlft_kernels._C`` or None, where it was loaded from or why it could not be).

    Tests run from a source checkout import the package from the checkout, which holds no
    compiled files after ``pip install .``; the extension that install built is then loaded
    from the installed distribution. Any failure to load (a missing file, a stale build, a
    torch ABI mismatch) is returned as a reason, never raised.
    """
    try:
        _C = importlib.import_module("nlft_kernels._C")
    except ModuleNotFoundError as err:
        if err.name != "nlft_kernels._C":
            return None, _load_failure(err, Path(__file__).parent)
        installed = _installed_file("_C.")
        if installed is None:
            return None, _not_built(err)
        return _load_installed(installed)
    except Exception as err:  # noqa: BLE001 - ImportError, OSError: undefined symbols, wrong ABI
        return None, _load_failure(err, Path(__file__).parent)
    return _C, f"loaded from {_C.__file__}"


def compiled() -> ModuleType:
    """``nlft_kernels._C`` for a kernel call of a backend that needs it; RuntimeError with the
    reason when it cannot load (``resolve_backend`` has normally said so before)."""
    module, why = extension()
    if module is None:
        raise RuntimeError(f"nlft_kernels._C is unavailable: {why}")
    return module


def _load_installed(path: str) -> tuple[ModuleType | None, str]:
    spec = importlib.util.spec_from_file_location(
        "nlft_kernels._C", path, loader=importlib.machinery.ExtensionFileLoader("nlft_kernels._C", path)
    )
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - see extension()
        return None, _load_failure(err, Path(path).parent)
    sys.modules["nlft_kernels._C"] = module
    return module, f"loaded from the installed package ({path})"


def build_info() -> dict | None:
    """What setup.py recorded about the build of ``_C`` (in place first, then the installed
    distribution), or None when no build wrote it."""
    for path in (Path(__file__).parent / BUILD_INFO, _installed_file(BUILD_INFO)):
        if path is not None and Path(path).is_file():
            try:
                return json.loads(Path(path).read_text())
            except (OSError, ValueError):
                return None
    return None


def _not_built(err: BaseException) -> str:
    info = build_info()
    if info and info.get("extension") != "built" and info.get("reason"):
        return f"nlft_kernels._C was not built at install: {info['reason']}"
    return f"nlft_kernels._C is not built ({err}); build it with {REBUILD}"


def _load_failure(err: BaseException, package_dir: Path) -> str:
    built_against = None
    info_path = package_dir / BUILD_INFO
    if info_path.is_file():
        try:
            built_against = json.loads(info_path.read_text()).get("torch")
        except (OSError, ValueError):
            built_against = None
    if built_against and built_against != torch.__version__:
        cause = f"it was built against torch {built_against}, this is torch {torch.__version__}"
    else:
        cause = "stale or built against another torch"
    return f"nlft_kernels._C does not load ({type(err).__name__}: {err}); {cause}: rebuild with {REBUILD}"


def _installed_file(prefix: str) -> str | None:
    """Path of ``nlft_kernels/<prefix>...`` in the installed distribution, if any (the compiled
    extension for ``"_C."``)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES) if prefix == "_C." else ("",)
    # Every distribution of that name on sys.path: in a checkout where `pip install .` ran, the
    # checkout's own nlft_kernels.egg-info (which lists no compiled file) comes first.
    for dist in importlib.metadata.distributions(name="nlft-kernels"):
        for file in dist.files or []:
            if file.parent.name == "nlft_kernels" and file.name.startswith(prefix) and file.name.endswith(suffixes):
                path = str(file.locate())
                if os.path.exists(path):
                    return path
    return None
