"""The C++ CPU row pass of nlft_kernels._C against the float64 reference.

tests/ops/test_nlft_loss.py runs its whole suite with backend "cpp" as well (shapes, padding,
teacher log-probs, clusters, errors); here: every dtype the kernel accumulates in, vocabulary
sizes around its tile and vector widths, mixed teacher dtypes, each instruction-set copy, and
the row partition over threads; and token_logprobs' C++ forward (label_logprobs).
"""

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlft_kernels import nlft_loss, token_logprobs
from nlft_kernels.reference import REDUCTIONS, nlft_loss_reference, token_logprobs_reference
from tests._inputs import generator, make_inputs, seed_of
from tests.conftest import dtype_params
from tests.csrc import extension_or_skip
from tests.ops.test_nlft_loss import assert_details, assert_exercised, run_both, teacher
from tests.tolerances import assert_grad_close, assert_loss_close

ROOT = Path(__file__).resolve().parents[2]
DTYPES = dtype_params(torch.float32, torch.bfloat16, torch.float16, torch.float64)
# float64 logits accumulate in float64: the loss and the gradient match the reference to
# rounding, far below the float32-accumulation tolerances of tests/tolerances.py.
FLOAT64_RTOL = 1e-10
# The kernel's vocabulary tile (csrc/cpu/row_pass_kernel.cpp, kTile).
TILE = 2048


@pytest.fixture(autouse=True)
def ext():
    return extension_or_skip()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, reduction):
    """Values, gradient and details; every branch of the rule fires (the 6% rule included)."""
    x = make_inputs(8, 20, 300, dtype=dtype, seed=seed_of("cpp", dtype, reduction))
    (loss, grad, details), (ref, ref_grad, ref_details) = run_both(x, reduction, "cpp")
    assert_exercised(ref_details, x.correct)
    assert details.killed.any(), "the 6% rule did not fire"
    assert_loss_close(loss, ref)
    assert_grad_close(grad, ref_grad, dtype)
    assert_details(details, ref_details, x.labels, x.correct)
    if dtype == torch.float64:
        assert loss.dtype == torch.float64
        loss, ref = loss.detach(), ref.detach()
        torch.testing.assert_close(loss, ref, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL * float(ref.abs().max()))
        atol = FLOAT64_RTOL * float(ref_grad.abs().max())
        torch.testing.assert_close(grad, ref_grad, rtol=FLOAT64_RTOL, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_is_stored_once_in_the_logits_dtype(dtype):
    """The gradient is one [N, V] buffer in the logits' dtype: written by the row pass in forward
    for float32, bfloat16 and float64 (backward's fix-up then rescales the rows of the 6% rule in
    place), or, for float16, in backward from the saved lse (GradScaler's factor arrives with
    grad_output; stored before it, most entries would flush to 0: tests/ops/test_launch_hazards.py),
    when forward saves no [N, V] buffer at all."""
    x = make_inputs(8, 20, 300, dtype=dtype, seed=seed_of("cpp grad dtype", dtype))
    base = x.base.detach().clone().requires_grad_()
    loss, details = nlft_loss(
        base, x.labels, x.correct, standard=x.standard, judge=x.judge, backend="cpp", return_details=True
    )
    assert details.killed.any(), "no row was rescaled"
    saved = [t for t in loss.grad_fn.saved_tensors if t.dim() == 3]
    if dtype == torch.float16:
        assert [t.data_ptr() for t in saved] == [base.data_ptr()], "float16 saves the logits, no gradient buffer"
    else:
        assert len(saved) == 1 and saved[0].dtype == dtype and saved[0].shape == base.shape
    (grad,) = torch.autograd.grad(loss, base)
    assert grad.dtype == dtype
    if dtype != torch.float16:
        assert grad.data_ptr() == saved[0].data_ptr(), "backward returns the buffer forward wrote"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [7, TILE + 1])
def test_scale_rows(ext, dtype, vocab):
    """scale_rows multiplies every row of a gradient buffer by its factor, in place, in the
    accumulator type: rows whose factor is 1 keep their bits (never written), rows whose factor
    is 0 become zeros even where they held NaN (written without a read)."""
    g = generator(vocab)
    grad = torch.randn(12, vocab, generator=g).to(dtype)
    grad[4] = float("nan")
    before = grad.clone()
    factor = torch.rand(12, generator=g, dtype=torch.float64) * 3
    factor[[1, 2, 7]] = 1.0
    factor[[4, 9]] = 0.0
    ext.scale_rows(grad, factor)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = (before.to(acc) * factor[:, None].to(acc)).to(dtype)
    expected[[1, 2, 7]] = before[[1, 2, 7]]
    expected[[4, 9]] = 0
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("vocab", [1, 7, 33, TILE, TILE + 1, 2 * TILE + 13])
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16, torch.float16))
def test_vocabulary_sizes_around_tile_and_vector(vocab, dtype):
    """Partial vectors (V below 16 lanes), exact tiles and a partial last tile."""
    x = make_inputs(4, 6, vocab, dtype=dtype, seed=vocab)
    (loss, grad, details), (ref, ref_grad, ref_details) = run_both(x, "sample_mean", "cpp")
    assert_loss_close(loss, ref)
    assert_grad_close(grad, ref_grad, dtype)
    assert_details(details, ref_details, x.labels, x.correct)
    assert (x.labels == -100).any(), "no padding rows"


@pytest.mark.parametrize("vocab", [1, 7, 33, TILE, TILE + 1, 2 * TILE + 13])
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_kernel(vocab, dtype):
    """token_logprobs' C++ forward (label_logprobs): log-probs and lse of strided [B, T, V]
    logits, zero on ignored rows; its gradient (torch's backward from that lse) too."""
    g = generator(vocab)
    logits = (torch.randn(3, 9, vocab, generator=g) * 4).to(dtype)[:, 1:].requires_grad_()  # strided rows
    labels = torch.randint(0, vocab, (3, 8), generator=g)
    labels[0, -3:] = labels[2, 0] = -100
    lp = token_logprobs(logits, labels, backend="cpp")
    ref_logits = logits.detach().double().requires_grad_()
    ref = token_logprobs_reference(ref_logits, labels)
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype == torch.float64:
        torch.testing.assert_close(lp, ref, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL)
    else:
        assert_loss_close(lp, ref)
    assert not lp[labels == -100].any()
    grad_out = torch.randn(labels.shape, dtype=torch.float64, generator=g)
    (grad,) = torch.autograd.grad(lp, logits, grad_out.to(lp.dtype))
    (ref_grad,) = torch.autograd.grad(ref, ref_logits, grad_out)
    assert_grad_close(grad, ref_grad, dtype)
    _, lse = extension_or_skip().label_logprobs(logits.detach(), labels.reshape(-1), -100)
    valid = labels.reshape(-1) != -100
    expected = torch.logsumexp(logits.detach().double(), -1).reshape(-1)
    torch.testing.assert_close(lse[valid].double(), expected[valid], rtol=1e-5, atol=1e-5)


def test_token_logprobs_is_cpp_on_the_cpu(monkeypatch):
    """backend="auto" on CPU tensors runs the C++ forward and backward when _C is built."""
    import dataclasses

    from nlft_kernels.backends import REGISTRY

    calls, real = [], REGISTRY["cpp"]

    def recording(name):
        def call(*args):
            calls.append(name)
            return getattr(real, name)(*args)

        return call

    names = ("label_logprobs", "softmax_grad")
    monkeypatch.setitem(REGISTRY, "cpp", dataclasses.replace(real, **{name: recording(name) for name in names}))
    g = generator(seed_of("auto takes cpp"))
    logits, labels = torch.randn(2, 3, 50, generator=g).requires_grad_(), torch.randint(0, 50, (2, 3), generator=g)
    token_logprobs(logits, labels).sum().backward()
    assert calls == ["label_logprobs", "softmax_grad"]


def test_teacher_views_in_other_dtypes():
    """bfloat16 base logits with float32 standard and float16 judge logits (widened per view)."""
    x = make_inputs(8, 20, 300, dtype=torch.bfloat16, seed=21)
    standard, judge = x.standard.float(), x.judge.half()
    base = x.base.detach().clone().requires_grad_()
    loss, details = nlft_loss(
        base, x.labels, x.correct, standard=standard, judge=judge, backend="cpp", return_details=True
    )
    ref_base = x.base.detach().double().requires_grad_()
    ref, ref_details = nlft_loss_reference(ref_base, x.labels, x.correct, standard, judge, return_details=True)
    assert_exercised(ref_details, x.correct)
    assert_loss_close(loss, ref)
    loss.backward()
    ref.backward()
    assert_grad_close(base.grad, ref_base.grad, torch.bfloat16)
    assert_details(details, ref_details, x.labels, x.correct)


def test_strided_views_are_read_in_place():
    """Rows of every view taken from wider tensors (row strides that are not V)."""
    x = make_inputs(6, 12, 257, seed=13)
    g = generator(13)
    pad = lambda t: torch.cat([t.detach(), torch.randn(6, 3, 257, generator=g)], dim=1)[:, :12]  # noqa: E731
    base = pad(x.base).requires_grad_()
    standard, judge = pad(x.standard), pad(x.judge)
    assert not base.is_contiguous() and not standard.is_contiguous()
    loss = nlft_loss(base, x.labels, x.correct, standard=standard, judge=judge, backend="cpp")
    (ref_loss, ref_grad, _), _ = run_both(x, "sample_mean", "torch")
    assert_loss_close(loss, ref_loss)
    (grad,) = torch.autograd.grad(loss, base)
    assert_grad_close(grad, ref_grad, torch.float32)


def test_rows_split_over_threads_give_the_same_bits():
    """at::parallel_for hands rows to threads; each row is computed by one thread, so any
    thread count gives identical results."""
    x = make_inputs(64, 40, 97, seed=17)
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            base = x.base.detach().clone().requires_grad_()
            loss = nlft_loss(base, x.labels, x.correct, standard=x.standard, judge=x.judge, backend="cpp")
            (grad,) = torch.autograd.grad(loss, base)
            outputs.append((loss, grad))
    finally:
        torch.set_num_threads(before)
    (loss_1, grad_1), (loss_n, grad_n) = outputs
    assert torch.equal(loss_1, loss_n) and torch.equal(grad_1, grad_n)


def test_without_gradient_the_statistics_are_the_same():
    x = make_inputs(8, 20, 300, seed=23)
    with torch.no_grad():
        loss, details = nlft_loss(
            x.base, x.labels, x.correct, standard=x.standard, judge=x.judge, backend="cpp", return_details=True
        )
    ref, ref_details = nlft_loss_reference(
        x.base.detach().double(), x.labels, x.correct, x.standard, x.judge, return_details=True
    )
    assert loss.grad_fn is None
    assert_loss_close(loss, ref)
    assert_details(details, ref_details, x.labels, x.correct)


_COPY_SCRIPT = """
import tests.conftest  # first: it sets TRITON_INTERPRET before triton is imported
from tests.ops.test_nlft_loss import run_both
from tests._inputs import generator, make_inputs, seed_of
from tests.tolerances import assert_grad_close, assert_loss_close
import torch
from nlft_kernels.extension import extension
module, why = extension()
assert module is not None, why
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    x = make_inputs(8, 20, 2 * 2048 + 29, dtype=dtype, seed=31)
    (loss, grad, _), (ref, ref_grad, _) = run_both(x, "sample_mean", "cpp")
    assert_loss_close(loss, ref)
    assert_grad_close(grad, ref_grad, dtype)
from nlft_kernels import token_logprobs
from nlft_kernels.reference import token_logprobs_reference
g = generator(seed_of("copy", "token_logprobs"))
logits = torch.randn(3, 5, 2 * 2048 + 29, generator=g) * 3
labels = torch.randint(0, 2 * 2048 + 29, (3, 5), generator=g)
assert_loss_close(token_logprobs(logits, labels, backend="cpp"), token_logprobs_reference(logits.double(), labels))
print("capability", module.cpu_capability())
"""


def _copies_this_cpu_runs() -> list[str]:
    best = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    return order[: order.index(best) + 1] if best in order else ["DEFAULT"]


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_each_instruction_set_copy(capability, ext):
    """setup.py compiles the kernel once per instruction set; ATEN_CPU_CAPABILITY (read once
    per process, hence the subprocess) makes the dispatcher pick each copy this CPU can run."""
    if capability not in _copies_this_cpu_runs():
        pytest.skip(f"this CPU cannot run the {capability} copy (best: {torch.backends.cpu.get_cpu_capability()})")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower(), PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    done = subprocess.run([sys.executable, "-c", _COPY_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"capability {capability}" in done.stdout, done.stdout


def test_only_the_wide_copies_use_wide_instructions(ext):
    """The three copies of the kernel are linked into one library; code shared between them
    (inline functions, templates) must not come from the AVX2/AVX-512 objects, or the DEFAULT
    copy would fault on CPUs without them. No function outside nlft::cpu::AVX2/AVX512 (and
    at::vec's own per-ISA namespaces) may use VEX/EVEX-encoded instructions."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not found")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("off x86 the library holds one copy of the kernel")
    text = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-C", ext.__file__], capture_output=True, text=True, check=True
    ).stdout
    offenders, function, wide = set(), None, ("::AVX2::", "::AVX512::")
    for line in text.splitlines():
        if line.endswith(">:") and " <" in line:
            function = line.split(" <", 1)[1][:-2]
        elif function and ("%ymm" in line or "%zmm" in line or re.search(r"\tv[a-z0-9]+\s+.*%xmm", line)):
            if not any(w in function for w in wide):
                offenders.add(function)
    assert not offenders, sorted(offenders)[:20]


# Labels that are neither ignore_index (-100) nor in [0, V): just past the row, far past it (into
# other rows), and negative (into the row before).
OUT_OF_RANGE = ("V", "V+1000", -5)


def _bad_labels(labels: torch.Tensor, vocab: int, rows) -> torch.Tensor:
    bad = labels.clone()
    for (b, t), value in zip(rows, OUT_OF_RANGE, strict=True):
        bad[b, t] = {"V": vocab, "V+1000": vocab + 1000}.get(value, value)
    return bad


@pytest.mark.parametrize("forms", [("logits", "logits"), ("logprobs", "logprobs")])
@pytest.mark.parametrize("reduction", ["sample_mean", "none"])
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16, torch.float64))
def test_out_of_range_labels_give_nan_rows(dtype, reduction, forms):
    """validate=False lets labels outside [0, V) (not ignore_index) reach the kernel. It reads
    nothing at such a label (before, base[label] and the teacher rows were read out of bounds):
    the row's log-probs from logits, its token loss and its whole gradient row are NaN, also with
    teachers given as log-probs (whose coefficient alone would be finite), and it is not salient.
    Every other row equals the reference on the original labels, the killed (6% rule) wrong
    sample included: each bad row replaces a non-saliency row, so the rule decides the same."""
    vocab = 300
    x = make_inputs(4, 20, vocab, dtype=dtype, seed=seed_of("out_of_range", dtype, reduction, forms))
    ones = torch.ones(x.labels.shape if reduction == "none" else (), dtype=torch.float64)
    ref_loss, ref_grad, ref_details = run_both(x, reduction, "torch", forms, grad_out=ones)[1]
    # Rows of the correct sample, the killed wrong sample and the wrong sample with one saliency token.
    rows = []
    for b in (0, 1, 2):
        t = int((~ref_details["saliency"][b] & (x.labels[b] != -100)).nonzero()[0])
        rows.append((b, t))
    assert ref_details["killed"][1].any() and not ref_details["killed"][2].any(), "the 6% rule did not split"
    labels = _bad_labels(x.labels, vocab, rows)
    bad = torch.zeros_like(labels, dtype=torch.bool)
    for b, t in rows:
        bad[b, t] = True
    standard = teacher(x, x.standard, forms[0])
    judge = teacher(x, x.judge, forms[1])
    base = x.base.detach().clone().requires_grad_()
    loss, details = nlft_loss(
        base,
        labels,
        x.correct,
        standard=standard,
        judge=judge,
        reduction=reduction,
        backend="cpp",
        validate=False,
        return_details=True,
    )
    (grad,) = torch.autograd.grad(loss, base, ones.to(loss.dtype))

    grad_nan = grad.isnan().all(-1)
    assert torch.equal(grad_nan, bad), "NaN gradient rows are not exactly the bad rows"
    assert not grad[~bad].isnan().any()
    assert_grad_close(grad[~bad], ref_grad[~bad], dtype)
    assert torch.equal(details.logprob_base.isnan(), bad)
    for name, form in zip(("logprob_standard", "logprob_judge"), forms, strict=True):
        used = bad & (~x.correct[:, None] if name == "logprob_judge" else True)
        assert torch.equal(getattr(details, name).isnan(), used if form == "logits" else torch.zeros_like(bad)), name
    assert torch.equal(details.token_loss.isnan(), bad)
    assert not (details.saliency & bad).any()
    good = ~bad & (x.labels != -100)
    assert_loss_close(details.token_loss[good], ref_details["token_loss"][good])
    assert_loss_close(details.logprob_base[good], ref_details["logprob_base"][good])
    for name in ("saliency", "killed"):
        assert torch.equal(getattr(details, name)[~bad], ref_details[name][~bad]), name
    if reduction == "none":
        assert torch.equal(loss.isnan(), bad)
        assert_loss_close(loss[~bad], ref_loss[~bad])
    else:
        assert loss.isnan()


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_out_of_range_labels_give_nan(dtype):
    """label_logprobs with validate=False: NaN exactly at labels outside [0, V) (nothing read
    there), zero at ignore_index, the reference everywhere else."""
    vocab = 257
    g = generator(5)
    logits = (torch.randn(3, 9, vocab, generator=g) * 4).to(dtype)[:, 1:]  # strided rows
    labels = torch.randint(0, vocab, (3, 8), generator=g)
    labels[0, -2:] = -100
    rows = [(0, 0), (1, 7), (2, 3)]
    bad_labels = _bad_labels(labels, vocab, rows)
    bad = bad_labels != labels
    lp = token_logprobs(logits, bad_labels, backend="cpp", validate=False)
    ref = token_logprobs_reference(logits.double(), labels)
    assert torch.equal(lp.isnan(), bad)
    if dtype == torch.float64:
        torch.testing.assert_close(lp[~bad], ref[~bad], rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL)
    else:
        assert_loss_close(lp[~bad], ref[~bad])
    assert not lp[labels == -100].any()
    _, lse = extension_or_skip().label_logprobs(logits, bad_labels.reshape(-1), -100)
    expected = torch.logsumexp(logits.double(), -1).reshape(-1)
    valid = labels.reshape(-1) != -100
    torch.testing.assert_close(lse[valid].double(), expected[valid], rtol=1e-5, atol=1e-5)
