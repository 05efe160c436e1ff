"""Tests of the compiled extension nlft_kernels._C (csrc/).

Without a built extension these tests skip with the reason backends() gives; CI, which builds
it, sets NLFT_REQUIRE_EXTENSION=1 so that a missing or broken build fails instead.
"""

import os

import pytest

from nlft_kernels.backends import extension

REQUIRED = os.environ.get("NLFT_REQUIRE_EXTENSION", "0") == "1"


def extension_or_skip():
    """nlft_kernels._C, or skip (fail under NLFT_REQUIRE_EXTENSION=1) with why it is missing."""
    module, why = extension()
    if module is None:
        if REQUIRED:
            pytest.fail(f"NLFT_REQUIRE_EXTENSION=1 but {why}")
        pytest.skip(f"nlft_kernels._C is not built: {why}")
    return module


def _cpp_marks():
    module, why = extension()
    if module is not None or REQUIRED:
        return ()
    return (pytest.mark.skip(reason=f"nlft_kernels._C is not built: {why}"),)


# The "cpp" backend as a pytest parameter: skipped with the reason when the extension is missing.
CPP_BACKEND = pytest.param("cpp", marks=_cpp_marks())
