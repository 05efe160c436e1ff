"""Tests of the compiled extension nlft_kernels._C (csrc/).

Without a built extension these tests skip with the reason backends() gives; CI, which builds
it, sets NLFT_REQUIRE_EXTENSION=1 so that a missing or broken build fails instead
(``tests.conftest.REQUIRE_EXTENSION``, which also keeps the "cpp" backend of the test matrix).
"""

import pytest

from nlft_kernels.extension import extension
from tests.conftest import REQUIRE_EXTENSION, backend_param


def extension_or_skip():
    """nlft_kernels._C, or skip (fail under NLFT_REQUIRE_EXTENSION=1) with why it is missing."""
    module, why = extension()
    if module is None:
        if REQUIRE_EXTENSION:
            pytest.fail(f"NLFT_REQUIRE_EXTENSION=1 but {why}")
        pytest.skip(f"nlft_kernels._C is not built: {why}")
    return module


# The "cpp" backend as a pytest parameter of the matrix: skipped with the reason when the
# extension is missing, failing instead under NLFT_REQUIRE_EXTENSION=1.
CPP_BACKEND = backend_param("cpp")
