"""Test setup, and the one test matrix: backends gated by device, dtypes with their tolerance,
named shapes.

Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. Test files take
their parameters from here (``backend_params``, ``dtype_params``, ``shape_params``,
``REAL_VOCABULARIES``, ``BEYOND_INT32``) instead of lists of their own, so that a backend added
to ``nlft_kernels.backends.REGISTRY`` reaches every test of the ops, and each one that cannot
run here is skipped with the registry's reason.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported; torch does not import it eagerly.
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py could set TRITON_INTERPRET"
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nlft_kernels.backends import REGISTRY, unavailable  # noqa: E402 - after TRITON_INTERPRET
from tests import interpreter_tree  # noqa: E402
from tests.tolerances import TOLERANCES  # noqa: E402

# Under the interpreter, tl.reduce with a combine function reduces in a tree, as a GPU does
# (tests/interpreter_tree.py); None where it does, else why not.
INTERPRETER_TREE = interpreter_tree.install() if os.environ.get("TRITON_INTERPRET") == "1" else "no interpreter"

CPU = torch.device("cpu")
GPU = torch.device("cuda")
# Where the GPU kernels compute in the tests marked gpu_too: CUDA tensors where a GPU is, else the CPU.
DEVICE = GPU if torch.cuda.is_available() else CPU

# CI builds nlft_kernels._C and sets NLFT_REQUIRE_EXTENSION=1: the C++ backend must then run,
# and a missing or broken build fails its tests instead of skipping them.
REQUIRE_EXTENSION = os.environ.get("NLFT_REQUIRE_EXTENSION", "0") == "1"
REQUIRED_BACKENDS = {"cpp"} if REQUIRE_EXTENSION else set()

# Backends left out of the matrix of tests whose inputs are CPU tensors, with the reason.
CPU_TENSORS_ONLY_EXCLUDED = {
    "cuda": "computes on CUDA tensors only; its tests are tests/csrc/test_cuda_kernel.py and the gpu_too tests"
}


def backend_device(name: str) -> torch.device:
    """The device a gpu_too test gives backend ``name`` its tensors on."""
    if name == "cuda":
        return GPU
    return DEVICE if name == "triton" else CPU


def skip_reason(name: str, device: torch.device = CPU) -> str | None:
    """Why a test of backend ``name`` on ``device`` is skipped here (the registry's reason), or
    None where it runs: where the backend can compute, or where the environment requires it
    (REQUIRED_BACKENDS), so that its tests fail instead."""
    why = unavailable(name, device)
    return None if why is None or name in REQUIRED_BACKENDS else f"backend={name!r} {why}"


def backend_param(name: str, device: torch.device = CPU):
    """``name`` as a pytest parameter, skipped with ``skip_reason`` where it has one."""
    reason = skip_reason(name, device)
    return pytest.param(name, id=name, marks=() if reason is None else pytest.mark.skip(reason=reason))


def backend_params(gpu_too: bool = False) -> list:
    """Every backend of the registry, in its order. By default for inputs on the CPU (Triton
    interpreted, without CUDA: ``CPU_TENSORS_ONLY_EXCLUDED``); ``gpu_too``: each backend on
    ``backend_device(name)``, the test moving its inputs there."""
    if gpu_too:
        return [backend_param(name, backend_device(name)) for name in REGISTRY]
    return [backend_param(name) for name in REGISTRY if name not in CPU_TENSORS_ONLY_EXCLUDED]


# For a test that names backend="triton" itself (the traffic hook, the real vocabularies, the
# compiled op): skipped like the matrix's where Triton cannot compute on DEVICE here (Triton <
# 3.7's interpreter with NumPy >= 2.4, say) instead of failing on that reason.
_TRITON_SKIP = skip_reason("triton", DEVICE)
NEEDS_TRITON = pytest.mark.skipif(_TRITON_SKIP is not None, reason=str(_TRITON_SKIP))


def dtype_params(*dtypes: torch.dtype) -> list:
    """The dtypes as pytest parameters named by their tolerance (``tests/tolerances.py``: fp32, bf16, ...)."""
    return [pytest.param(dtype, id=TOLERANCES[dtype].name) for dtype in dtypes]


LOW_PRECISION = (torch.bfloat16, torch.float16)

# Named (batch, steps, vocab) of make_inputs: a vocabulary that ends in a partial tile, one row
# per sample, and padding rows (make_inputs pads sample b with b mod 3 rows) at a power-of-two V.
SHAPES = {"partial tile": (3, 7, 1000), "T=1": (5, 1, 129), "padding": (4, 20, 64)}
# Llama-2 / Mistral, GPT-2 (odd: no 16-byte alignment of rows), Llama-3, Qwen2, Gemma: a few rows each.
REAL_VOCABULARIES = [pytest.param(v, id=f"real vocabulary {v}") for v in (32000, 50257, 128256, 151936, 256000)]
# N * V > 2**31 entries: offsets past int32 (GPU only, and slow: GBs of logits).
BEYOND_INT32_VOCAB = 128256
BEYOND_INT32 = pytest.param(
    (2**31 // BEYOND_INT32_VOCAB + 3, BEYOND_INT32_VOCAB),
    id="N*V > 2^31",
    marks=(
        pytest.mark.slow,
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="N*V > 2^31 needs a GPU (GBs of logits)"),
    ),
)


def shape_params(*names: str) -> list:
    """The named shapes as pytest parameters, the name as their id."""
    return [pytest.param(SHAPES[name], id=name) for name in names]
