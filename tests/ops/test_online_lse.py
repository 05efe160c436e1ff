"""What the per-lane online log-sum-exp of the row kernels (``ops/tl_utils.py``) could get wrong,
against float64: lanes that see only masked or -inf entries, logits of +-1e4 and the running
maximum's start value itself (-1e30), the maximum arriving at every entry (a rising row) or in
the last partial tile, one tile or many (an odd count of full tiles: the unrolled loop's
remainder), and rows that are ignored reading nothing.

Every backend runs the same rows (Triton under the interpreter here, on the GPU where there is
one), through the package's public functions and its own launch configuration.
"""

import contextlib

import numpy as np
import pytest
import torch

from nlft_kernels import nlft_loss, token_logprobs
from nlft_kernels.ops.launch import launch_config
from nlft_kernels.ops.tl_utils import LSE_START
from nlft_kernels.reference import nlft_loss_reference, token_logprobs_reference
from tests._inputs import generator, seed_of
from tests.conftest import NEEDS_TRITON, backend_params, dtype_params
from tests.tolerances import GRAD_ATOL_FRACTION, GRAD_RTOL

BACKENDS = backend_params()
# Row kinds of ``extreme_logits``, one per row (in this order, cycling).
KINDS = ("dead lanes", "rising", "huge", "tiny", "one finite entry", "ignored")


def extreme_logits(rows: int, vocab: int, block: int, dtype: torch.dtype, seed: int):
    """(logits [rows, vocab] in ``dtype``, labels [rows]): one row of each of ``KINDS``.

    dead lanes: the first 16 columns of every tile of ``block`` and the last 3 columns are -inf
        (the threads owning them never see a finite entry);
    rising: an increasing ramp from -30 to 30 (a new maximum at every entry of every lane);
    huge: +-1e4 entries, the row's maximum (1e4) in the last, partial tile;
    tiny: every entry -1e4 or the running maximum's start value (-1e30) or -inf;
    one finite entry: -inf but the label's entry (log p = 0, gradient 0);
    ignored: label -100.
    """
    g = generator(seed)
    x = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (rows,), generator=g)
    cols = torch.arange(vocab)
    for r in range(rows):
        kind = KINDS[r % len(KINDS)]
        if kind == "dead lanes":
            dead = (cols % block < 16) | (cols >= vocab - 3)
            x[r, dead] = float("-inf")
            labels[r] = int(torch.nonzero(~dead)[len(torch.nonzero(~dead)) // 2])
        elif kind == "rising":
            x[r] = torch.linspace(-30, 30, vocab, dtype=torch.float64)
        elif kind == "huge":
            picks = torch.randint(0, vocab, (vocab // 50,), generator=g)
            x[r, picks] = -1e4
            x[r, picks[: len(picks) // 2]] = 1e4
            x[r, vocab - 1] = 1e4 + 8  # the maximum, in the last tile
        elif kind == "tiny":
            x[r] = -1e4
            x[r, cols % 3 == 1] = LSE_START.value
            x[r, cols % 7 == 2] = float("-inf")
            labels[r] = int(torch.nonzero(x[r] == -1e4)[0])
        elif kind == "one finite entry":
            x[r] = float("-inf")
            x[r, labels[r]] = 0.5
        else:
            labels[r] = -100
    x = x.to(dtype)
    assert x.isfinite().any(dim=1).all() and (x == LSE_START.value).any() and (x.abs() == 1e4).any()
    return x, labels


def magnitude(view: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the largest of |row max| and |label entry| (at least 1): float32 computes a
    log-sum-exp to about 2**-23 of it, and the log-prob and softmax inherit that absolute error."""
    view = view.double()
    label_entry = view.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return torch.maximum(view.amax(dim=-1).abs(), label_entry.abs()).clamp(min=1)


def assert_within(actual, expected, atol, rtol, what: str) -> None:
    """|actual - expected| <= atol + rtol * |expected|, ``atol`` and ``rtol`` scalars or per row."""
    actual, expected = actual.detach().double(), expected.detach().double()
    atol, rtol = (torch.as_tensor(t, dtype=torch.float64) for t in (atol, rtol))
    atol, rtol = (t.view(t.shape + (1,) * (actual.dim() - t.dim())) for t in (atol, rtol))
    worst = ((actual - expected).abs() - atol - rtol * expected.abs()).max()
    assert worst <= 0, f"{what}: exceeds its bound by {float(worst):.3g}"


def assert_logprobs_close(actual, expected, scale) -> None:
    """Log-probs to 1e-5 plus float32's error at the rows' magnitude (``magnitude``)."""
    assert_within(actual, expected, 1e-5 + 2**-21 * scale, 1e-5, "log-probs")


def assert_grad_close_at_magnitude(grad, ref_grad, dtype: torch.dtype, scale) -> None:
    """tests/tolerances.py's gradient tolerance of ``dtype``, its rtol widened per row by
    float32's error at the row's magnitude (a softmax is exp(x - lse): lse's error, relative)."""
    atol = GRAD_ATOL_FRACTION[dtype] * max(float(ref_grad.abs().max()), 1e-6)
    assert_within(grad, ref_grad, atol, GRAD_RTOL[dtype] + 2**-21 * scale, "gradient")


def vocabularies(dtype: torch.dtype) -> list[int]:
    """One partial tile, and 5 full tiles (odd: the unrolled loop's remainder) plus a partial one,
    of the row pass's three-view tile for ``dtype`` (the package's own launch configuration)."""
    block = launch_config("row_pass", 1 << 20, 3, dtype).block_v
    assert launch_config("token_logprobs", 1 << 20, 1, dtype).block_v == block
    return [block // 2 + 37, 5 * block + 77]


def cases():
    return [
        pytest.param(dtype.values[0], vocab, id=f"{dtype.id}-V={vocab}")
        for dtype in dtype_params(torch.float32, torch.bfloat16)
        for vocab in vocabularies(dtype.values[0])
    ]


@pytest.mark.parametrize("dtype, vocab", cases())
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_of_extreme_rows(backend, dtype, vocab):
    block = launch_config("token_logprobs", vocab, 1, dtype).block_v
    x, labels = extreme_logits(2 * len(KINDS), vocab, block, dtype, seed_of("extreme token_logprobs", vocab, dtype))
    logits = x.clone().requires_grad_()
    lp = token_logprobs(logits, labels, backend=backend)
    ref_logits = x.double().requires_grad_()
    ref = token_logprobs_reference(ref_logits, labels)
    assert lp.isfinite().all()
    scale = magnitude(x, labels)
    assert_logprobs_close(lp, ref, scale)
    one_finite = torch.tensor([KINDS[r % len(KINDS)] == "one finite entry" for r in range(len(labels))])
    assert (lp[one_finite] == 0).all()
    g = torch.randn(labels.shape, generator=generator(vocab), dtype=torch.float64)
    (grad,) = torch.autograd.grad(lp, logits, g.float())
    (ref_grad,) = torch.autograd.grad(ref, ref_logits, g)
    assert grad.isfinite().all() and grad.dtype == dtype
    assert_grad_close_at_magnitude(grad, ref_grad, dtype, scale)
    assert (grad[labels == -100] == 0).all()


def three_views(batch: int, vocab: int, dtype: torch.dtype, seed: int):
    """(base, standard, judge [batch, len(KINDS), vocab], labels): the rows of ``extreme_logits``
    for every sample, the teachers the base plus noise (-inf, +-1e4 and -1e30 stay what they are
    to float32's precision)."""
    block = launch_config("row_pass", vocab, 3, dtype).block_v
    x, labels = extreme_logits(batch * len(KINDS), vocab, block, torch.float64, seed)
    g = generator(seed + 1)
    views = [x] + [x + torch.where(x.isfinite(), torch.randn(x.shape, generator=g, dtype=x.dtype), 0) for _ in "sj"]
    shape = (batch, len(KINDS), vocab)
    return *(v.to(dtype).view(shape) for v in views), labels.view(shape[:2])


@pytest.mark.parametrize("dtype, vocab", cases())
@pytest.mark.parametrize("backend", BACKENDS)
def test_nlft_loss_of_extreme_rows(backend, dtype, vocab):
    """The three views' log-probs against float64's log-softmax, the gradient against the reference."""
    base, standard, judge, labels = three_views(2, vocab, dtype, seed_of("extreme nlft_loss", vocab, dtype))
    correct = torch.tensor([True, False])
    x = base.clone().requires_grad_()
    loss, details = nlft_loss(
        x, labels, correct, standard=standard, judge=judge, backend=backend, reduction="none", return_details=True
    )
    valid = labels != -100
    for name, view, rows in (
        ("logprob_base", base, valid),
        ("logprob_standard", standard, valid),
        ("logprob_judge", judge, valid & ~correct[:, None]),
    ):
        expected = torch.log_softmax(view.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        actual = getattr(details, name)
        assert actual.isfinite().all(), name
        assert_logprobs_close(actual[rows], expected[rows], magnitude(view, labels)[rows])
        assert (actual[~rows] == 0).all(), name
    assert loss.isfinite().all()
    g = torch.randn(loss.shape, generator=generator(vocab), dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, x, g.to(loss.dtype))
    ref_base = base.double().requires_grad_()
    ref = nlft_loss_reference(ref_base, labels, correct, standard, judge, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref, ref_base, g)
    assert grad.isfinite().all()
    assert_grad_close_at_magnitude(grad, ref_grad, grad.dtype, magnitude(base, labels))
    assert (grad[~valid] == 0).all()


@contextlib.contextmanager
def loaded_addresses():
    """The byte addresses of every element the interpreter loads inside the block (masked-off
    lanes excluded), as arrays. tests/ops/test_traffic.py counts bytes the same way; this wrapper
    passes the builder's arguments through whatever their number (Triton 3.8 added one)."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    if not hasattr(interpreter, "interpreter_builder"):
        pytest.skip("not Triton's interpreter (a GPU runs the kernels)")
    builder, found = interpreter.interpreter_builder, []
    load = builder.create_masked_load

    def recorded(ptrs, mask, *args):
        shape = np.broadcast_shapes(ptrs.data.shape, mask.data.shape)
        taken = np.broadcast_to(mask.data, shape).astype(bool)  # a broadcast scalar mask arrives as int64
        found.append(np.broadcast_to(ptrs.data, shape)[taken].astype(np.uint64))
        return load(ptrs, mask, *args)

    builder.create_masked_load = recorded
    try:
        yield found
    finally:
        builder.create_masked_load = load


@NEEDS_TRITON
def test_ignored_rows_read_nothing():
    """The row pass's and the label log-probs' loops run no iteration on an ignored row: no
    load touches its bytes in any view, forward or backward; the other rows are read."""
    vocab = vocabularies(torch.float32)[1]
    base, standard, judge, labels = three_views(1, vocab, torch.float32, seed_of("ignored rows read nothing"))
    ignored = labels.view(-1) == -100
    assert ignored.any() and (~ignored).any()
    x = base.clone().requires_grad_()
    with loaded_addresses() as found:
        loss = nlft_loss(x, labels, torch.tensor([False]), standard=standard, judge=judge, backend="triton")
        lp = token_logprobs(x, labels, backend="triton")
        torch.autograd.grad(loss + lp.sum(), x)
    addresses = np.concatenate(found)
    for view in (x, standard, judge):
        assert view.is_contiguous()
        rows = (addresses.astype(np.int64) - view.data_ptr()) // (vocab * view.element_size())
        read = np.unique(rows[(rows >= 0) & (rows < ignored.numel())])
        assert sorted(read.tolist()) == torch.nonzero(~ignored).flatten().tolist()
