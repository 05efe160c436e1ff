"""The kernels move the bytes their docstrings state: loads and stores counted in an interpreter run.

The interpreter executes every ``tl.load`` / ``tl.store`` through one builder; wrapping its two
masked memory operations counts the bytes each actually touches (masked-off lanes excluded),
attributed to the tensor whose memory they fall in. The counts must equal the traffic model in
``nlft_kernels/ops/launch.py`` that benchmarks divide by time for GB/s.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from nlft_kernels import nlft_loss, token_logprobs
from nlft_kernels.ops.launch import launch_config, row_pass_traffic, token_logprobs_traffic
from tests._inputs import generator, make_inputs, seed_of

interpreter = pytest.importorskip("triton.runtime.interpreter")
if not hasattr(interpreter, "interpreter_builder"):
    pytest.skip("not Triton's interpreter (a GPU runs the kernels)", allow_module_level=True)


class Traffic:
    """Addresses touched by masked loads and stores (masked-off lanes excluded), with their
    element sizes; ``bytes(tensor, kind)`` attributes them to a tensor's memory afterwards."""

    def __init__(self) -> None:
        self.touched: dict[str, list[tuple[np.ndarray, int]]] = {"load": [], "store": []}

    def add(self, ptrs, mask, kind: str) -> None:
        shape = np.broadcast_shapes(ptrs.data.shape, mask.data.shape)
        addresses = np.broadcast_to(ptrs.data, shape)[np.broadcast_to(mask.data, shape)]
        self.touched[kind].append(
            (addresses.astype(np.uint64), interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize)
        )

    def bytes(self, tensor: torch.Tensor | None, kind: str) -> int:
        """Bytes of ``kind`` in ``tensor``'s storage; None: everything."""
        total = 0
        for addresses, size in self.touched[kind]:
            if tensor is None:
                total += addresses.size * size
                continue
            lo = tensor.untyped_storage().data_ptr()
            hi = lo + tensor.untyped_storage().nbytes()
            total += int(((addresses >= lo) & (addresses < hi)).sum()) * size
        return total


@contextlib.contextmanager
def count_bytes():
    """Count the loads and stores of the Triton kernels launched inside the block."""
    builder = interpreter.interpreter_builder
    traffic = Traffic()
    load, store = builder.create_masked_load, builder.create_masked_store

    # The cache arguments after the mask vary with Triton's version: passed through as they come.
    def counted_load(ptrs, mask, *rest):
        traffic.add(ptrs, mask, "load")
        return load(ptrs, mask, *rest)

    def counted_store(ptrs, value, mask, *rest):
        traffic.add(ptrs, mask, "store")
        return store(ptrs, value, mask, *rest)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield traffic
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("judge_form", ["logits", "logprobs"])
@pytest.mark.parametrize("vocab", [300, 9000])
def test_row_pass_moves_what_its_docstring_says(vocab, judge_form, dtype):
    """V=300: one partial tile; V=9000: several tiles (the package's own launch configuration)."""
    x = make_inputs(4, 5, vocab, dtype=dtype, seed=seed_of("traffic", vocab, judge_form, dtype))
    assert vocab < 1000 or vocab > launch_config("row_pass", vocab, 2 + (judge_form == "logits"), dtype).block_v
    base = x.base.detach().clone().requires_grad_()
    judge = x.judge
    if judge_form == "logprobs":
        judge = torch.log_softmax(judge.double(), -1).gather(-1, x.labels.clamp(min=0)[..., None])[..., 0]
    with count_bytes() as traffic:
        loss, details = nlft_loss(
            base, x.labels, x.correct, standard=x.standard, judge=judge, backend="triton", return_details=True
        )
    (grad_buffer,) = loss.grad_fn.saved_tensors
    valid = x.labels != -100
    wrong_rows = int((valid & ~x.correct[:, None]).sum())
    correct_rows = int(valid.sum()) - wrong_rows
    rescaled = int((details.killed | details.cluster).sum())
    assert wrong_rows and correct_rows and rescaled and (~valid).any(), "rows of each kind, rescaled rows, padding"

    model = {
        kind: row_pass_traffic(
            vocab,
            dtype,
            standard_logits=True,
            judge_logits=judge_form == "logits",
            wrong=kind == "wrong",
            grad_type=grad_buffer.dtype,
        )
        for kind in ("correct", "wrong")
    }
    expected = {
        name: correct_rows * model["correct"][name] + wrong_rows * model["wrong"][name] for name in model["wrong"]
    }
    assert traffic.bytes(base, "load") == expected["base"]
    assert traffic.bytes(x.standard, "load") == expected["standard"]
    assert traffic.bytes(x.judge, "load") == expected["judge"]
    # The gradient row is written for every row (zeros at padding); the rows the per-sample stage
    # rescales (the 6% rule) are read and written once more by the scaling kernel.
    grad_row = model["correct"]["grad"]
    assert traffic.bytes(grad_buffer, "store") == (x.labels.numel() + rescaled) * grad_row
    assert traffic.bytes(grad_buffer, "load") == rescaled * grad_row
    for view in (base, x.standard, x.judge):
        assert traffic.bytes(view, "store") == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("vocab", [300, 40000])
def test_token_logprobs_moves_what_its_docstring_says(vocab, dtype):
    g = generator(seed_of("traffic token_logprobs", vocab, dtype))
    logits = torch.randn(5, vocab, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (5,), generator=g)
    labels[2] = -100
    model = token_logprobs_traffic(vocab, dtype)
    with count_bytes() as forward:
        lp = token_logprobs(logits, labels, backend="triton")
    with count_bytes() as backward:
        (grad,) = torch.autograd.grad(lp.sum(), logits)
    assert forward.bytes(logits, "load") == 4 * model["forward"]["logits"]
    assert backward.bytes(logits, "load") == 4 * model["backward"]["logits"]
    # every row's gradient is written, zeros at the ignored one
    assert backward.bytes(grad, "store") == 5 * model["backward"]["grad"]
