"""Test setup: without a GPU, Triton kernels run on CPU tensors through Triton's interpreter."""

import os
import sys

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported; torch does not import it eagerly.
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py could set TRITON_INTERPRET"
    os.environ.setdefault("TRITON_INTERPRET", "1")
