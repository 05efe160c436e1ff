"""The kernels move the bytes the traffic model states (``nlft_kernels/ops/traffic.py``): loads and
stores counted in an interpreter run.

The model, per labelled row and in units of one [V] row, for ``nlft_loss`` forward+backward
with ``grad_output == 1``: gradient written in forward (float32, bfloat16) 4 units of DRAM
traffic with three logit views and 2 with one, plus the row pass's re-read of the base row,
which a GPU serves from L2 and the interpreter counts as a load (``base_reread``); backward's
pass moves only the rows whose total factor is not 1 (a factor of 0 writes zeros unread);
``grad_output != 1`` adds 2 units (every row read and written once). Gradient written in
backward (float16): 5 and 3 units.

The interpreter executes every ``tl.load`` / ``tl.store`` through one builder; wrapping its two
masked memory operations counts the bytes each actually touches (masked-off lanes excluded),
attributed to the tensor whose memory they fall in. The hook takes the pointers and the mask
by position (first and second of a load; first and third of a store), which Triton 3.x keeps
across its versions while the trailing arguments change (3.8 added ``eviction_policy``); the
unmasked loads and stores of full tiles reach them too (the builder's ``create_load`` and
``create_store`` call them with an all-true mask, in Triton 3.6 and 3.8).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from nlft_kernels import nlft_loss, token_logprobs, token_weighted_cross_entropy
from nlft_kernels.ops.contracts import GradStore
from nlft_kernels.ops.launch import launch_config
from nlft_kernels.ops.traffic import (
    dram_units,
    nlft_backward_traffic,
    nlft_forward_traffic,
    token_logprobs_traffic,
    weighted_ce_traffic,
)
from tests._inputs import generator, make_inputs, seed_of
from tests.conftest import NEEDS_TRITON

interpreter = pytest.importorskip("triton.runtime.interpreter")
if not hasattr(interpreter, "interpreter_builder") or not hasattr(interpreter, "_get_np_dtype"):
    import triton

    pytest.skip(
        f"Triton {triton.__version__}: no interpreter builder to count loads and stores with (a GPU runs the kernels)",
        allow_module_level=True,
    )


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
    def counted_load(ptrs, mask, *rest, **kwargs):
        traffic.add(ptrs, mask, "load")
        return load(ptrs, mask, *rest, **kwargs)

    def counted_store(ptrs, value, mask, *rest, **kwargs):
        traffic.add(ptrs, mask, "store")
        return store(ptrs, value, mask, *rest, **kwargs)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield traffic
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store


def _saved_grad(loss: torch.Tensor) -> torch.Tensor:
    """The [N, V] buffer forward wrote (GradStore.FORWARD)."""
    (grad,) = [t for t in loss.grad_fn.saved_tensors if t.dim() == 3]
    return grad


@NEEDS_TRITON
def test_the_hook_counts_what_a_kernel_touches():
    """A known launch through the hook: the label kernel reads each labelled row once and its
    label entry, nothing of an ignored row."""
    g = generator(seed_of("hook"))
    logits = torch.randn(3, 100, generator=g)
    labels = torch.tensor([5, -100, 7])
    with count_bytes() as traffic:
        token_logprobs(logits, labels, backend="triton")
    assert traffic.bytes(logits, "load") == 2 * 101 * 4


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("views", [3, 1])
def test_units_of_one_row(views, dtype):
    """The headline of the model: fwd+bwd with grad_output == 1 on rows whose per-sample factor is
    1 moves 4 units of DRAM traffic with three logit views and 2 with one (the teachers as [N]
    log-probs), plus the base row's L2 re-read; the interpreter's counts equal the model's bytes."""
    vocab, rows = 2000, 6
    g = generator(seed_of("units", views, dtype))
    base = (torch.randn(1, rows, vocab, generator=g) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, rows), generator=g)
    correct = torch.tensor([False])  # a wrong sample: the judge row is read
    judge = base.detach() - 1.0  # p_j = p_b: no saliency, so no per-sample fix-up
    standard = base.detach() + torch.randn(1, rows, vocab, generator=g).to(dtype)
    if views == 1:
        pick = labels[..., None]
        standard = torch.log_softmax(standard.double(), -1).gather(-1, pick)[..., 0]
        judge = torch.log_softmax(judge.double(), -1).gather(-1, pick)[..., 0]
    with count_bytes() as forward:
        loss, details = nlft_loss(base, labels, correct, standard=standard, judge=judge, backend="triton",
                                  return_details=True)  # fmt: skip
    assert not (details.saliency | details.killed).any(), "the rows must keep their provisional gradient"
    grad = _saved_grad(loss)
    with count_bytes() as backward:
        loss.backward()
    model = nlft_forward_traffic(vocab, dtype, standard_logits=views == 3, judge_logits=views == 3, wrong=True,
                                 store=GradStore.FORWARD)  # fmt: skip
    back = nlft_backward_traffic(vocab, dtype, store=GradStore.FORWARD, factor=1.0)
    assert dram_units(model, back, vocab, dtype) == pytest.approx(views + 1 + views / vocab)
    assert forward.bytes(base, "load") == rows * (model["base"] + model["base_reread"])
    assert forward.bytes(grad, "store") == rows * model["grad"]
    logits_views = [standard, judge] if views == 3 else []
    assert sum(forward.bytes(v, "load") for v in logits_views) == rows * (model["standard"] + model["judge"])
    # grad_output == 1 and no fix-up: backward reads each row's factor (a scalar) and moves no row.
    assert backward.bytes(grad, "load") == backward.bytes(grad, "store") == backward.bytes(base, "load") == 0
    assert backward.bytes(None, "load") == rows * 4 and backward.bytes(None, "store") == 0


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("judge_form", ["logits", "logprobs"])
@pytest.mark.parametrize("vocab", [300, 9000])
@pytest.mark.parametrize("grad_out", [1.0, 0.5])
def test_row_pass_moves_what_the_model_says(vocab, judge_form, dtype, grad_out):
    """Every kind of row (correct, wrong, killed by the 6% rule, padding), the gradient written in
    forward (bf16, fp32) or in backward (fp16), grad_output 1 or not; V=300: one partial tile;
    V=9000: several tiles (the package's own launch configuration)."""
    x = make_inputs(4, 5, vocab, dtype=dtype, seed=seed_of("traffic", vocab, judge_form, dtype))
    assert vocab < 1000 or vocab > launch_config("row_pass", vocab, 2 + (judge_form == "logits"), dtype).block_v
    base = x.base.detach().clone().requires_grad_()
    judge = x.judge
    if judge_form == "logprobs":
        judge = torch.log_softmax(judge.double(), -1).gather(-1, x.labels.clamp(min=0)[..., None])[..., 0]
    with count_bytes() as forward:
        loss, details = nlft_loss(
            base, x.labels, x.correct, standard=x.standard, judge=judge, backend="triton", return_details=True
        )
    store = GradStore.of(dtype, True)
    grad = _saved_grad(loss) if store == GradStore.FORWARD else None
    with count_bytes() as backward:
        (returned,) = torch.autograd.grad(loss, base, torch.tensor(grad_out))
    grad = returned if grad is None else grad
    valid = x.labels != -100
    wrong = (valid & ~x.correct[:, None]).flatten()
    killed = details.killed.flatten()
    assert wrong.any() and (valid.flatten() & ~wrong).any() and killed.any() and (~valid).any(), "every kind of row"

    def forward_row(is_wrong):
        return nlft_forward_traffic(vocab, dtype, standard_logits=True, judge_logits=judge_form == "logits",
                                    wrong=is_wrong, store=store)  # fmt: skip

    rows_fwd = [forward_row(bool(w)) if v else dict.fromkeys(forward_row(False), 0)
                for v, w in zip(valid.flatten(), wrong, strict=True)]  # fmt: skip
    # Padding rows read nothing; every gradient row is written (zeros at padding).
    expected_grad_fwd = x.labels.numel() * vocab * dtype.itemsize if store == GradStore.FORWARD else 0
    assert forward.bytes(base, "load") == sum(r["base"] + r["base_reread"] for r in rows_fwd)
    assert forward.bytes(x.standard, "load") == sum(r["standard"] for r in rows_fwd)
    assert forward.bytes(x.judge, "load") == sum(r["judge"] for r in rows_fwd)
    # The total factor of each row in backward: the fix-up (0 for killed rows) times grad_output
    # (FORWARD); the row's coefficient times grad_output (BACKWARD: 0 at padding, else not).
    if store == GradStore.FORWARD:
        factors = [0.0 if k else grad_out for k in killed.tolist()]
    else:
        factors = [0.0 if (k or not v) else 0.7 for k, v in zip(killed.tolist(), valid.flatten().tolist(), strict=True)]
    rows_bwd = [nlft_backward_traffic(vocab, dtype, store=store, factor=f) for f in factors]
    assert forward.bytes(grad, "store") == expected_grad_fwd
    assert backward.bytes(base, "load") == sum(r["base"] for r in rows_bwd)
    if store == GradStore.FORWARD:
        assert backward.bytes(grad, "load") == sum(r["grad_read"] for r in rows_bwd)
    assert backward.bytes(grad, "store") == sum(r["grad_write"] for r in rows_bwd)
    for view in (x.standard, x.judge):
        assert forward.bytes(view, "store") == backward.bytes(view, "store") == 0
    if store == GradStore.FORWARD:
        assert forward.bytes(base, "store") == backward.bytes(base, "load") == 0


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("vocab", [300, 40000])
def test_token_logprobs_moves_what_the_model_says(vocab, dtype):
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


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_token_weighted_cross_entropy_moves_two_units(dtype):
    """One read of each labelled row, its gradient written once by the same program (the re-read
    counted apart as L2 traffic); a row of weight 0 is read once and written as zeros; ignored
    rows read nothing; backward with grad_output == 1 moves no row."""
    vocab = 3000
    g = generator(seed_of("traffic weighted ce", dtype))
    logits = torch.randn(6, vocab, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (6,), generator=g)
    labels[5] = -100
    weights = torch.rand(6, generator=g)
    weights[4] = 0.0
    with count_bytes() as forward:
        loss = token_weighted_cross_entropy(logits, labels, weights, backend="triton")
    (grad,) = [t for t in loss.grad_fn.saved_tensors if t.dim() == 3]
    with count_bytes() as backward:
        loss.backward()
    model = weighted_ce_traffic(vocab, dtype)
    assert (model["base"] + model["grad"]) / (vocab * dtype.itemsize) == pytest.approx(2 + 1 / vocab)
    assert forward.bytes(logits, "load") == 5 * model["base"] + 4 * model["base_reread"]
    assert forward.bytes(grad, "store") == 6 * model["grad"]
    assert backward.bytes(grad, "load") == backward.bytes(grad, "store") == 0
