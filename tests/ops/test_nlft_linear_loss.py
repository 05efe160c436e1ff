"""nlft_linear_loss and linear_token_logprobs against the float64 reference.

The oracle evaluates the float64 reference on the logits ``F.linear`` would give, the exact
(float64) product ``hidden @ weight.T + bias`` of the input-dtype tensors rounded once to the
input dtype (the fused path's chunk logits: one GEMM with float32 accumulation), with the
gradient flowing to hidden, weight and bias through the exact product. The teachers' label
log-probs (``linear_token_logprobs``) come from float32 logits tiles: they agree with the exact
product itself.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import nlft_kernels.ops.chunk_rows as chunk_module  # noqa: E402
import nlft_kernels.ops.linear_chunks as linear_module  # noqa: E402
from nlft_kernels import (  # noqa: E402
    NLFTConfig,
    NLFTLinearLoss,
    linear_token_logprobs,
    nlft_linear_loss,
    nlft_loss,
)
from nlft_kernels.backends import unavailable  # noqa: E402
from nlft_kernels.ops.chunk_rows import compute_bound_rows  # noqa: E402
from nlft_kernels.ops.nlft_linear_loss import chunk_rows_for, sample_groups  # noqa: E402
from nlft_kernels.reference import REDUCTIONS, nlft_loss_reference, token_logprobs_reference  # noqa: E402
from tests._inputs import generator, make_inputs, seed_of  # noqa: E402
from tests.conftest import CPU, NEEDS_TRITON, REQUIRED_BACKENDS, backend_params, dtype_params  # noqa: E402
from tests.tolerances import LINEAR_GRAD_TOL, LOSS_RTOL  # noqa: E402

LINEAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = dtype_params(*LINEAR_DTYPES)
# Saliency decisions of wrong samples are kept this far (in log space) from their thresholds,
# so that a 16-bit logit cannot flip one: the tests compare values, not coin tosses.
DECISION_MARGIN = 0.25
# The C++ kernel where it runs here (or is required: NLFT_REQUIRE_EXTENSION=1), else torch: the
# chunkings below that name it run either way.
CPU_KERNEL = "cpp" if "cpp" in REQUIRED_BACKENDS or unavailable("cpp", CPU) is None else "torch"
# (rows per chunk, cluster criterion, backend) against make_linear_case's 4 samples x 20 rows:
# 7 splits every sample (and 80 rows end in a partial chunk), 45 holds two whole samples.
# Chunks of whole samples get their final gradient at once; a split sample is read once for its
# statistics, then goes through the whole pass with its second stage's factors in its scale.
# The Triton row pass and cluster walk (interpreted here) run in test_triton_backend.
CHUNKINGS = [
    (7, "distance", "torch"),
    (45, "distance", CPU_KERNEL),
    (45, "off", "torch"),
    (7, "off", CPU_KERNEL),
]


@dataclass
class LinearCase:
    hidden: torch.Tensor  # [B, T, D] leaf
    weight: torch.Tensor  # [V, D] leaf
    bias: torch.Tensor | None  # [V] leaf
    labels: torch.Tensor  # [B, T]
    correct: torch.Tensor  # [B]
    standard: torch.Tensor  # [B, T, V] logits, input dtype
    judge: torch.Tensor  # [B, T, V] logits, input dtype


def make_linear_case(dtype, seed, batch=4, steps=20, vocab=67, dim=16, bias=True, pad=True) -> LinearCase:
    """make_inputs' labels, samples, teachers and hidden states, with base logits from an LM head.

    The judge view of wrong samples keeps make_inputs' offset from the base logits (noise plus
    the lifted labels), now measured from ``hidden @ weight.T + bias``.
    """
    x = make_inputs(batch, steps, vocab, seed=seed, pad=pad, hidden_dim=dim)
    g = generator(seed + 1000)
    weight = torch.randn(vocab, dim, generator=g) * 2 / (dim**0.5 * float(x.hidden.std()))
    b = 0.5 * torch.randn(vocab, generator=g) if bias else None
    hidden, weight = x.hidden.to(dtype), weight.to(dtype)
    b = b.to(dtype) if bias else None
    logits = hidden.double() @ weight.double().T + (b.double() if bias else 0.0)
    wrong = ~x.correct
    judge = x.judge.double()
    judge[wrong] = logits[wrong] + (x.judge.double() - x.base.detach().double())[wrong]
    valid = (x.labels != -100) & wrong[:, None]
    safe = x.labels.clamp(min=0)[..., None]
    lp_b = torch.log_softmax(logits, -1).gather(-1, safe).squeeze(-1)
    lp_s = torch.log_softmax(x.standard.double(), -1).gather(-1, safe).squeeze(-1)
    for _ in range(4):
        lp_j = torch.log_softmax(judge, -1).gather(-1, safe).squeeze(-1)
        margins = torch.stack([lp_j - lp_b - math.log(1.5), lp_j - lp_s - math.log(1.5), lp_j - math.log(0.01)])
        robust = (margins > DECISION_MARGIN).all(0) | (margins < -DECISION_MARGIN).any(0)
        borderline = valid & ~robust
        if not borderline.any():
            break
        judge.scatter_add_(-1, safe, -8.0 * borderline[..., None].double())
    assert not borderline.any()
    return LinearCase(
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        bias=b.requires_grad_() if bias else None,
        labels=x.labels,
        correct=x.correct,
        standard=x.standard.to(dtype),
        judge=judge.to(dtype),
    )


def params(case: LinearCase) -> tuple[torch.Tensor, ...]:
    return (case.hidden, case.weight) + ((case.bias,) if case.bias is not None else ())


def teacher(case: LinearCase, view: torch.Tensor, form: str) -> torch.Tensor:
    """A teacher view as logits, or as [B, T] float32 label log-probs."""
    return view if form == "logits" else token_logprobs_reference(view, case.labels).float()


def linear_logits(exact_params: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The float64 logits of ``F.linear`` in ``dtype``: the exact product of the float64
    ``exact_params`` (hidden, weight[, bias]) rounded once to ``dtype``, the gradient flowing
    through the exact product (the rounding is the identity for it)."""
    logits = exact_params[0] @ exact_params[1].T
    if len(exact_params) > 2:
        logits = logits + exact_params[2]
    return logits + (logits.detach().to(dtype).double() - logits.detach())


def oracle(case: LinearCase, standard, judge, reduction="sample_mean", grad_out=None, config=None):
    """(loss, grads, details) of the float64 reference on the input-dtype logits of the
    input-dtype tensors (``linear_logits``)."""
    exact_params = [p.detach().double().requires_grad_() for p in params(case)]
    logits = linear_logits(exact_params, case.hidden.dtype)
    loss, details = nlft_loss_reference(
        logits,
        case.labels,
        case.correct,
        standard,
        judge,
        config or NLFTConfig(),
        reduction,
        case.hidden.detach(),
        return_details=True,
    )
    grads = torch.autograd.grad(loss, exact_params, grad_out)
    return loss, grads, details


def fused(case: LinearCase, standard, judge, reduction="sample_mean", grad_out=None, **kwargs):
    loss, details = nlft_linear_loss(
        case.hidden,
        case.weight,
        case.labels,
        case.correct,
        standard=standard,
        judge=judge,
        bias=case.bias,
        reduction=reduction,
        return_details=True,
        **kwargs,
    )
    grads = torch.autograd.grad(loss, params(case), None if grad_out is None else grad_out.to(loss.dtype))
    return loss, grads, details


def assert_exercised(details, correct: torch.Tensor, clusters: bool = True) -> None:
    """Every branch occurs: saliency of correct samples, unlikelihood, the 6% rule firing on one
    wrong sample and sparing another that has a saliency token, and cluster neighbours (or none
    with ``clusters`` off)."""
    saliency, killed = details["saliency"], details["killed"]
    assert saliency[correct].any(), "no saliency token in a correct sample"
    assert details["unlikelihood"].any(), "no unlikelihood token"
    assert killed.any(), "the 6% rule never fired"
    assert (~correct & saliency.any(1) & ~killed.any(1)).any(), "no wrong sample spared by the 6% rule"
    assert details["cluster"].any() == clusters, "cluster neighbours where none were asked for, or none"


def assert_close(loss, grads, ref_loss, ref_grads, dtype) -> None:
    rtol = LOSS_RTOL
    ref_loss = ref_loss.detach()
    scale = float(ref_loss.abs().max())
    torch.testing.assert_close(loss.detach().double(), ref_loss, rtol=rtol, atol=rtol * max(scale, 1e-3))
    grad_rtol, atol_fraction = LINEAR_GRAD_TOL[dtype]
    names = ("hidden", "weight", "bias")[: len(grads)]
    for name, grad, ref in zip(names, grads, ref_grads, strict=True):
        assert grad.dtype == dtype, f"{name} gradient is {grad.dtype}"
        atol = atol_fraction * float(ref.abs().max())
        torch.testing.assert_close(grad.double(), ref, rtol=grad_rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def splits_samples(case: LinearCase, chunk_size: int) -> bool:
    """Whether the driver's schedule has a sample longer than a chunk (its statistics pass, then
    the pass with its factors folded in), from the [B, T] layout as the driver plans it."""
    steps = case.labels.shape[1]
    sample_ids = torch.arange(case.labels.numel()) // steps
    return any(stop - start > chunk_size for start, stop in sample_groups(sample_ids, chunk_size, steps))


@pytest.mark.parametrize("chunk_size,criterion,backend", CHUNKINGS, ids=["-".join(map(str, c)) for c in CHUNKINGS])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("form", ["logits", "logprobs"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_materialised(dtype, form, bias, chunk_size, criterion, backend):
    case = make_linear_case(dtype, seed=LINEAR_DTYPES.index(dtype) * 4 + 2 * (form == "logits") + bias, bias=bias)
    config = NLFTConfig(cluster_criterion=criterion)
    standard, judge = teacher(case, case.standard, form), teacher(case, case.judge, form)
    ref_loss, ref_grads, ref_details = oracle(case, standard, judge, config=config)
    assert_exercised(ref_details, case.correct, clusters=criterion != "off")
    assert splits_samples(case, chunk_size) == (chunk_size < case.labels.shape[1])
    loss, grads, details = fused(case, standard, judge, chunk_size=chunk_size, backend=backend, config=config)
    assert_close(loss, grads, ref_loss, ref_grads, dtype)
    for name in ("saliency", "unlikelihood", "cluster", "killed"):
        assert torch.equal(getattr(details, name), ref_details[name]), name


@pytest.mark.parametrize("chunk_size,criterion", [(5, "distance"), (45, "off")])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_and_upstream_gradient(reduction, chunk_size, criterion):
    case = make_linear_case(torch.float32, seed=31)
    config = NLFTConfig(cluster_criterion=criterion)
    g = generator(5)
    grad_out = torch.randn(case.labels.shape, generator=g, dtype=torch.float64) if reduction == "none" else None
    grad_out = torch.tensor(1.7, dtype=torch.float64) if grad_out is None else grad_out
    ref_loss, ref_grads, ref_details = oracle(case, case.standard, case.judge, reduction, grad_out, config)
    assert_exercised(ref_details, case.correct, clusters=criterion != "off")
    loss, grads, _ = fused(case, case.standard, case.judge, reduction, grad_out, chunk_size=chunk_size, config=config)
    assert loss.shape == ref_loss.shape
    assert_close(loss, grads, ref_loss, ref_grads, torch.float32)


@pytest.mark.parametrize("criterion", ["distance", "off"])
def test_equals_core_op_on_materialised_logits(criterion):
    """Same numbers as nlft_loss(hidden @ weight.T + bias) with hidden_states=hidden (fp32)."""
    case = make_linear_case(torch.float32, seed=7)
    config = NLFTConfig(cluster_criterion=criterion)
    loss, grads, details = fused(case, case.standard, case.judge, config=config, chunk_size=11)
    logits = case.hidden @ case.weight.T + case.bias
    ref, ref_details = nlft_loss(
        logits,
        case.labels,
        case.correct,
        standard=case.standard,
        judge=case.judge,
        config=config,
        hidden_states=case.hidden,
        return_details=True,
    )
    ref_grads = torch.autograd.grad(ref, params(case))
    assert details.cluster.any() == (criterion != "off")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5 * float(ref_grad.abs().max()))
    for name in ("saliency", "cluster", "killed", "weight"):
        torch.testing.assert_close(getattr(details, name), getattr(ref_details, name))


@pytest.mark.parametrize("chunk_size", [9, 30])
def test_flat_rows_with_sample_ids(chunk_size):
    """Samples of 18 to 20 rows: 9 rows per chunk splits them, 30 holds one or two."""
    case = make_linear_case(torch.float32, seed=13)
    valid = case.labels != -100
    sample_ids = torch.arange(case.labels.shape[0])[:, None].expand_as(case.labels)[valid]
    hidden = case.hidden.detach()[valid].requires_grad_()
    loss, details = nlft_linear_loss(
        hidden,
        case.weight,
        case.labels[valid],
        case.correct,
        standard=case.standard[valid],
        judge=case.judge[valid],
        bias=case.bias,
        sample_ids=sample_ids,
        chunk_size=chunk_size,
        return_details=True,
    )
    grads = torch.autograd.grad(loss, (hidden, case.weight, case.bias))
    ref_loss, ref_grads, ref_details = oracle(case, case.standard, case.judge)
    assert_exercised(ref_details, case.correct)
    assert details.saliency.shape == (int(valid.sum()),)
    assert_close(loss, (grads[0], *grads[1:]), ref_loss, (ref_grads[0][valid], *ref_grads[1:]), torch.float32)


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16))
def test_triton_backend(dtype):
    """The Triton first stage (interpreted on the CPU) inside the chunked matmuls."""
    case = make_linear_case(dtype, seed=41, vocab=40, dim=8)
    ref_loss, ref_grads, ref_details = oracle(case, case.standard, case.judge)
    assert_exercised(ref_details, case.correct)
    loss, grads, _ = fused(case, case.standard, case.judge, chunk_size=32, backend="triton")
    assert_close(loss, grads, ref_loss, ref_grads, dtype)


def test_frozen_head_and_no_grad(monkeypatch):
    """LoRA-style: only hidden trains; under no_grad the same loss comes out with no graph and
    no gradient is computed (forward alone must not pay for the two gradient matmuls)."""
    import nlft_kernels.ops.linear_chunks as op

    case = make_linear_case(torch.float32, seed=17)
    weight, bias = case.weight.detach(), case.bias.detach()
    loss = nlft_linear_loss(
        case.hidden, weight, case.labels, case.correct, standard=case.standard, judge=case.judge, bias=bias
    )
    (grad,) = torch.autograd.grad(loss, case.hidden)
    ref_loss, ref_grads, _ = oracle(case, case.standard, case.judge)
    assert_close(loss, (grad,), ref_loss, ref_grads[:1], torch.float32)

    def no_gradients(*args, **kwargs):
        raise AssertionError("gradients computed under torch.no_grad")

    monkeypatch.setattr(op, "Grads", no_gradients)
    with torch.no_grad():
        quiet = nlft_linear_loss(
            case.hidden, weight, case.labels, case.correct, standard=case.standard, judge=case.judge, bias=bias
        )
    assert not quiet.requires_grad
    torch.testing.assert_close(quiet, loss.detach())


# torch and Triton only: the C++ label log-probs are tested in tests/ops/test_token_logprobs.py,
# and linear_token_logprobs only chunks the matmul around them.
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_TRITON)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_token_logprobs(dtype, backend):
    if backend == "triton" and dtype == torch.float16:
        pytest.skip("one 16-bit dtype is enough under the interpreter")
    case = make_linear_case(dtype, seed=3, vocab=45, dim=8)
    logits = case.hidden.detach().double() @ case.weight.detach().double().T + case.bias.detach().double()
    expected = token_logprobs_reference(logits, case.labels)
    for chunk_size in (5, None):
        lp = linear_token_logprobs(
            case.hidden, case.weight, case.labels, case.bias, chunk_size=chunk_size, backend=backend
        )
        assert lp.dtype == torch.float32 and lp.shape == case.labels.shape and not lp.requires_grad
        torch.testing.assert_close(lp.double(), expected, rtol=1e-5, atol=1e-5)
    flat = linear_token_logprobs(case.hidden.flatten(0, 1), case.weight, case.labels.flatten(), chunk_size=4)
    torch.testing.assert_close(
        flat.view(case.labels.shape), linear_token_logprobs(case.hidden, case.weight, case.labels)
    )


def bf16_terms(x: torch.Tensor, terms: int = 3) -> torch.Tensor:
    """[..., terms] bfloat16 values whose float64 sum is ``x`` (float64) to about 2**-24 |x|."""
    out, rest = [], x
    for _ in range(terms):
        out.append(rest.to(torch.bfloat16))
        rest = rest - out[-1].double()
    return torch.stack(out, -1)


@dataclass
class ThresholdCase:
    hidden: torch.Tensor  # [3, B, T, D] bfloat16: base, standard, judge
    weight: torch.Tensor  # [V, D] bfloat16
    labels: torch.Tensor  # [B, T]
    correct: torch.Tensor  # [B]
    logits: torch.Tensor  # [3, B, T, V] float64: the exact product hidden @ weight.T


def make_threshold_case(seed: int, batch=4, steps=8, vocab=64) -> ThresholdCase:
    """bfloat16 hidden states and head whose exact logits (24 to 36: bfloat16 steps of 1/8 and
    1/4) put every row's saliency decision within 1e-3..6e-3 of its threshold in log space:
    p_s against 0.95 in the correct samples (0, 1); p_j / p_b and p_j / p_s against 1.5 in turn
    in the wrong ones (2, 3), the other ratio at 3 and p_j = 0.3. Each (view, row) owns three
    hidden coordinates set to 1, and the head holds there three bfloat16 terms summing to the
    designed logits: the product is exact in float64 and within ~1e-6 of it in float32."""
    g = generator(seed)
    rows = batch * steps
    labels = torch.randint(0, vocab, (rows,), generator=g)
    magnitude = torch.tensor([1e-3, 2e-3, 4e-3, 6e-3])[torch.arange(rows) % 4]
    delta = magnitude * torch.where(torch.arange(rows) % 8 < 4, 1.0, -1.0).double()
    sample = torch.arange(rows) // steps
    correct = torch.arange(batch) < batch // 2
    log15, lp_j = math.log(1.5), torch.full((rows,), math.log(0.3), dtype=torch.float64)
    lp_s = torch.where(correct[sample], math.log(0.95) + delta, lp_j - math.log(3))
    lp_b = torch.where(correct[sample], math.log(0.3), lp_j - log15 - delta)
    ratio2 = ~correct[sample] & (torch.arange(rows) % 2 == 1)  # rows deciding on p_j / p_s
    lp_s = torch.where(ratio2, lp_j - log15 - delta, lp_s)
    lp_b = torch.where(ratio2, lp_j - math.log(3), lp_b)
    hidden = torch.zeros(3, rows, 9 * rows, dtype=torch.bfloat16)
    weight = torch.zeros(vocab, 9 * rows, dtype=torch.bfloat16)
    for view, lp in enumerate((lp_b, lp_s, lp_j)):
        logits = 24 + 6 * torch.rand(rows, vocab, generator=g, dtype=torch.float64)
        others = logits.scatter(1, labels[:, None], float("-inf")).logsumexp(1)
        p = lp.exp()
        logits.scatter_(1, labels[:, None], (others + torch.log(p / (1 - p)))[:, None])
        for row in range(rows):
            cols = slice(3 * (view * rows + row), 3 * (view * rows + row) + 3)
            hidden[view, row, cols] = 1.0
            weight[:, cols] = bf16_terms(logits[row])
    exact = hidden.double() @ weight.double().T
    shape = (batch, steps)
    return ThresholdCase(
        hidden=hidden.view(3, *shape, -1),
        weight=weight,
        labels=labels.view(shape),
        correct=correct,
        logits=exact.view(3, *shape, vocab),
    )


def decision_margins(details, correct: torch.Tensor, cfg: NLFTConfig) -> torch.Tensor:
    """[B, T] signed distance in log space of each row's saliency decision from its threshold
    (positive: saliency): p_s vs tau in correct samples; the nearest of the three tests in wrong ones."""
    lp_b, lp_s, lp_j = (details[f"logprob_{v}"] for v in ("base", "standard", "judge"))
    wrong = torch.stack(
        [
            lp_j - lp_b - math.log(cfg.ratio_threshold),
            lp_j - lp_s - math.log(cfg.ratio_threshold),
            lp_j - math.log(cfg.judge_min_prob),
        ]
    ).min(0)[0]
    return torch.where(correct[:, None], lp_s - math.log(cfg.correct_threshold), wrong)


@pytest.mark.parametrize("backend", backend_params())
def test_bf16_decisions_near_thresholds(backend):
    """Decisions within 1e-3 of the 0.95 and 1.5x thresholds at logits near 30, where bfloat16
    logits (off by up to 1/16 there) flip some of them. The teachers' log-probs
    (linear_token_logprobs) come from float32 logits tiles: the decisions that rest on them
    alone follow the exact product of the bfloat16 inputs. The base view's chunk logits are
    bfloat16, as F.linear's: the decisions on p_j / p_b follow the reference on those."""
    case = make_threshold_case(seed=53)
    cfg = NLFTConfig(cluster_criterion="off")

    def reference(logits):
        return nlft_loss_reference(logits[0], case.labels, case.correct, logits[1], logits[2], cfg, return_details=True)

    _, exact = reference(case.logits)
    margins = decision_margins(exact, case.correct, cfg)
    assert bool((margins.abs() > 5e-4).all() & (margins.abs() < 1e-2).all()), margins
    assert exact["saliency"].any() and not exact["saliency"].all()
    _, rounded = reference(case.logits.to(torch.bfloat16).double())
    flipped = rounded["saliency"] != exact["saliency"]
    assert flipped[case.correct].any() and flipped[~case.correct].any(), "bfloat16 logits flip no decision here"
    # The fused path's logits: the base view's in bfloat16, the teachers' exact.
    mixed = case.logits.clone()
    mixed[0] = case.logits[0].to(torch.bfloat16).double()
    ref_loss, ref = reference(mixed)
    assert (ref["saliency"] != exact["saliency"])[~case.correct].any(), "the base view's rounding flips nothing"
    assert torch.equal(ref["saliency"][case.correct], exact["saliency"][case.correct])

    weight = case.weight.clone().requires_grad_()
    base = case.hidden[0].clone().requires_grad_()
    standard, judge = (
        linear_token_logprobs(case.hidden[view], case.weight, case.labels, backend=backend) for view in (1, 2)
    )
    loss, details = nlft_linear_loss(
        base,
        weight,
        case.labels,
        case.correct,
        standard=standard,
        judge=judge,
        config=cfg,
        chunk_size=12,
        backend=backend,
        return_details=True,
    )
    for name in ("saliency", "unlikelihood", "killed"):
        assert torch.equal(getattr(details, name), ref[name]), name
    for view, lp in zip(("base", "standard", "judge"), (details.logprob_base, standard, judge), strict=True):
        torch.testing.assert_close(lp.double(), ref[f"logprob_{view}"], rtol=0, atol=2e-5, msg=view)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=0)
    loss.backward()
    assert base.grad.dtype == weight.grad.dtype == torch.bfloat16


def test_module_with_lm_head_and_teacher_views_from_hidden():
    """NLFTLinearLoss over an nn.Linear, teachers given as their hidden states' log-probs."""
    case = make_linear_case(torch.float32, seed=23)
    head = nn.Linear(case.weight.shape[1], case.weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(case.weight)
        head.bias.copy_(case.bias)
    loss_fn = NLFTLinearLoss(head, chunk_size=10)
    g = generator(1)
    teacher_hidden = [case.hidden.detach() + torch.randn(case.hidden.shape, generator=g) for _ in range(2)]
    standard, judge = (loss_fn.teacher_logprobs(h, case.labels) for h in teacher_hidden)
    loss = loss_fn(case.hidden, case.labels, case.correct, standard=standard, judge=judge)
    loss.backward()
    ref = nlft_loss(
        head(case.hidden),
        case.labels,
        case.correct,
        standard=head(teacher_hidden[0]).detach(),
        judge=head(teacher_hidden[1]).detach(),
        hidden_states=case.hidden,
    )
    ref_grads = torch.autograd.grad(ref, (case.hidden, head.weight, head.bias))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip((case.hidden.grad, head.weight.grad, head.bias.grad), ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5 * float(ref_grad.abs().max()))


def test_module_needs_a_weight():
    with pytest.raises(ValueError, match="lm_head must have a weight tensor"):
        NLFTLinearLoss(nn.ReLU())


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.embed(tokens)))


def test_torch_compile_around_the_loss():
    """A compiled model feeding the loss, and a compiled step calling it (a graph break)."""
    case = make_linear_case(torch.float32, seed=29, vocab=50, dim=8)
    torch.manual_seed(0)  # TinyLM's initialisation (nn.Linear, nn.Embedding) draws from the global generator
    print("torch.manual_seed(0) before TinyLM(50, 8)")
    model = TinyLM(50, 8)
    tokens = case.labels.clamp(min=0)
    loss_fn = NLFTLinearLoss(model.lm_head, chunk_size=16)
    args = (case.labels, case.correct)
    teachers = dict(standard=case.standard, judge=case.judge)

    def step(net):
        return loss_fn(net(tokens), *args, **teachers)

    def eager_grads():
        ref = nlft_loss(model.lm_head(model(tokens)), *args, **teachers, hidden_states=model(tokens))
        return ref, torch.autograd.grad(ref, list(model.parameters()))

    ref, ref_grads = eager_grads()
    compiled_model = torch.compile(model, backend="aot_eager")
    compiled_step = torch.compile(step, backend="aot_eager")
    for loss in (step(compiled_model), compiled_step(model)):
        grads = torch.autograd.grad(loss, list(model.parameters()))
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for grad, ref_grad in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5 * float(ref_grad.abs().max()))


def test_autocast_runs_the_matmuls_in_the_autocast_dtype():
    case = make_linear_case(torch.float32, seed=37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nlft_linear_loss(
            case.hidden, case.weight, case.labels, case.correct, standard=case.standard, judge=case.judge
        )
    grads = torch.autograd.grad(loss, (case.hidden, case.weight))
    low = [p.detach().bfloat16().requires_grad_() for p in (case.hidden, case.weight)]
    expected = nlft_linear_loss(low[0], low[1], case.labels, case.correct, standard=case.standard, judge=case.judge)
    expected_grads = torch.autograd.grad(expected, low)
    torch.testing.assert_close(loss, expected)
    for grad, ref in zip(grads, expected_grads, strict=True):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, ref.float())


def test_autocast_accepts_mixed_dtypes():
    """Under autocast a model hands bf16 hidden states to a float32 head, as F.linear accepts."""
    case = make_linear_case(torch.float32, seed=38)
    hidden = case.hidden.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nlft_linear_loss(
            hidden, case.weight, case.labels, case.correct, standard=case.standard, judge=case.judge
        )
    grads = torch.autograd.grad(loss, (hidden, case.weight))
    low = [hidden.detach().requires_grad_(), case.weight.detach().bfloat16().requires_grad_()]
    expected = nlft_linear_loss(low[0], low[1], case.labels, case.correct, standard=case.standard, judge=case.judge)
    expected_grads = torch.autograd.grad(expected, low)
    torch.testing.assert_close(loss, expected)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32]
    for grad, ref in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, ref.to(grad.dtype))
    with pytest.raises(ValueError, match="same dtype"):
        nlft_linear_loss(hidden, case.weight, case.labels, case.correct, standard=case.standard, judge=case.judge)


def _error_cases():
    """(name, change to the keyword arguments, expected message, also for linear_token_logprobs)."""
    case = make_linear_case(torch.float32, seed=0, vocab=30, dim=8)
    hidden, weight = case.hidden.detach(), case.weight.detach()
    return [
        ("d-mismatch", dict(hidden=hidden[..., :5]), "hidden and weight must share the hidden size D", True),
        ("weight-1d", dict(weight=weight[0]), "weight must be a non-empty 2-D", True),
        ("weight-3d", dict(weight=weight[None]), "weight must be a non-empty 2-D", True),
        ("bias-size", dict(bias=torch.zeros(29)), r"bias must have shape \(30,\)", True),
        ("bias-dtype", dict(bias=torch.zeros(30, dtype=torch.float64)), "bias .* must have the same dtype", True),
        ("dtype-mismatch", dict(weight=weight.bfloat16()), r"hidden .* and weight .* must have the same dtype", True),
        ("hidden-1d", dict(hidden=hidden[0, 0]), "hidden must be a non-empty", True),
        ("labels-shape", dict(labels=case.labels[:, :-1]), "labels must have shape", True),
        ("labels-range", dict(labels=case.labels.clamp(min=0) + 30), r"labels must be in \[0, 30\)", True),
        ("chunk-size", dict(chunk_size=0), "chunk_size must be a positive int", True),
        ("correct-shape", dict(correct=case.correct[:-1]), "correct must have shape", False),
        ("judge-missing", dict(judge=None), "judge is required", False),
        ("standard-shape", dict(standard=case.standard[..., :-1]), "standard must be logits of shape", False),
        ("reduction", dict(reduction="mean"), "reduction must be one of", False),
        ("config", dict(config={}), "config must be an NLFTConfig", False),
        ("flat-without-ids", dict(hidden=hidden.flatten(0, 1), labels=case.labels.flatten()), "sample_ids", False),
    ], case


ERRORS, ERROR_CASE = _error_cases()


@pytest.mark.parametrize("change,message,teacher_too", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_the_argument(change, message, teacher_too, monkeypatch):
    """A ValueError naming the argument, raised before any matmul."""
    import nlft_kernels.ops.linear_chunks as op

    def no_compute(*args, **kwargs):
        raise AssertionError("computed before validating")

    monkeypatch.setattr(op.Head, "logits", no_compute)
    case = ERROR_CASE
    kwargs = dict(
        hidden=case.hidden.detach(),
        weight=case.weight.detach(),
        labels=case.labels,
        correct=case.correct,
        standard=case.standard,
        judge=case.judge,
        bias=case.bias.detach(),
    )
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        nlft_linear_loss(**kwargs)
    if teacher_too:
        names = ("hidden", "weight", "labels", "bias", "chunk_size")
        with pytest.raises(ValueError, match=message):
            linear_token_logprobs(**{k: kwargs[k] for k in names if k in kwargs})


def test_non_finite_logits_are_reported():
    case = make_linear_case(torch.float32, seed=0, vocab=30, dim=8)
    hidden = case.hidden.detach().clone()
    hidden[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"hidden @ weight.T \(\+ bias\) are non-finite"):
        nlft_linear_loss(hidden, case.weight, case.labels, case.correct, standard=case.standard, judge=case.judge)
    with pytest.raises(ValueError, match="non-finite"):
        linear_token_logprobs(hidden, case.weight, case.labels)


def test_sample_groups_cut_at_sample_boundaries():
    g = generator(11)
    lengths = torch.randint(1, 30, (40,), generator=g)
    sample_ids = torch.arange(40).repeat_interleave(lengths)
    for rows in (1, 7, 25, 64, 10_000):
        groups = sample_groups(sample_ids, rows)
        assert groups[0][0] == 0 and groups[-1][1] == sample_ids.numel()
        assert all(stop == start for (_, stop), (start, _) in zip(groups, groups[1:], strict=False))
        starts = torch.tensor([start for start, _ in groups])
        assert bool((sample_ids[starts[1:]] != sample_ids[starts[1:] - 1]).all()), "a sample was cut"
        for start, stop in groups:
            one_sample = bool(sample_ids[start] == sample_ids[stop - 1])
            assert stop - start <= rows or one_sample
            # greedy: the next sample would not have fitted
            if stop < sample_ids.numel() and stop - start < rows:
                assert stop - start + int(lengths[sample_ids[stop]]) > rows
    assert sample_groups(sample_ids, 10_000) == [(0, sample_ids.numel())]


def test_chunk_size_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # Enough memory: the byte cap decides (a row costs 2 V e: its logits, and a separate
    # gradient for the compiled row passes), and the rows split into balanced chunks.
    rows = chunk_rows_for(100_000, 128_256, 2, cpu, free=64 << 30)
    assert rows * 128_256 * 2 * 2 <= (128 << 20) * 1.1 and rows >= 16
    chunks = math.ceil(100_000 / rows)
    assert chunks * rows - 100_000 < rows
    # Little free memory: the chunk shrinks with it (down to a floor), never past N.
    assert chunk_rows_for(100_000, 128_256, 2, cpu, free=128 << 20) < rows
    assert chunk_rows_for(100_000, 128_256, 2, cpu, free=0) == 16
    assert chunk_rows_for(10, 32_000, 4, cpu, free=64 << 30) == 10
    # Off CUDA a chunk has at most D / 2 rows (D = 256: 128, whatever V; SmolLM2's D = 576:
    # 288, a multiple of 64: 256), below the byte cap's 512 at V = 32000; CUDA has no such cap.
    assert chunk_rows_for(1024, 32_000, 4, cpu, free=64 << 30) == 512
    assert chunk_rows_for(1024, 32_000, 4, cpu, free=64 << 30, dim=256) == 128
    assert chunk_rows_for(1024, 4096, 4, cpu, free=64 << 30, dim=256) == 128
    assert chunk_rows_for(4096, 49_152, 2, cpu, free=64 << 30, dim=576) == 256
    assert chunk_rows_for(1024, 32_000, 4, cuda, free=64 << 30, dim=256) == 1024
    # A larger vocabulary gets fewer rows per chunk.
    assert chunk_rows_for(100_000, 151_936, 2, cpu, free=64 << 30) < chunk_rows_for(
        100_000, 32_000, 2, cpu, free=64 << 30
    )


def dw_intensity(rows: int, vocab: int, dim: int, elem: int) -> float:
    """FLOP per byte of the dW GEMM [V, c] x [c, D] into a float32 [V, D] accumulator: 2 c V D
    FLOPs over G and the hidden chunk read once (e c (V + D)) and the accumulator read and
    written (8 V D)."""
    return 2 * rows * vocab * dim / (elem * rows * (vocab + dim) + 8 * vocab * dim)


@pytest.mark.parametrize("vocab", [32000, 128_256, 151_936])
@pytest.mark.parametrize("dim", [2048, 4096, 8192])
def test_gpu_chunks_keep_the_weight_gradient_gemm_compute_bound(dim, vocab):
    """On CUDA a chunk is at least as long as the dW GEMM needs to be compute-bound
    (``compute_bound_rows``: the fewest rows reaching the target intensity, ``_DW_INTENSITY``,
    twice the H100/H200 ridge point) when memory allows, and at most twice that; with little
    memory, memory decides. At V = 128256, D = 4096, bfloat16 that is over 1k rows."""
    cuda = torch.device("cuda")
    target = compute_bound_rows(vocab, dim, 2)
    assert dw_intensity(target, vocab, dim, 2) >= chunk_module._DW_INTENSITY > dw_intensity(target - 1, vocab, dim, 2)
    if (vocab, dim) == (128_256, 4096):
        assert target >= 1024
    for n in (target // 2, target + 1, 8192, 100_000):
        rows = chunk_rows_for(n, vocab, 2, cuda, free=80 << 30, dim=dim)
        assert rows == n if n <= 2 * target - 64 else target - 32 <= rows <= 2 * target, (n, rows)
    tight = chunk_rows_for(100_000, vocab, 2, cuda, free=1 << 30, dim=dim)
    memory = (1 << 30) // 4 // (2 * vocab * 2) // 64 * 64  # rows in a quarter of 1 GiB
    assert memory < target and memory / 2 < tight <= memory
    # A narrow head (D = 256) cannot be compute-bound at any length: a chunk stays within 1 GiB.
    assert compute_bound_rows(vocab, 256, 2) is None
    narrow = chunk_rows_for(100_000, vocab, 2, cuda, free=80 << 30, dim=256)
    assert (1 << 30) // (2 * vocab * 2) // 2 < narrow <= (1 << 30) // (2 * vocab * 2)


# Peak resident memory of one loss + backward, above the RSS before the call, for each
# (path, V) in turn in one fresh process: VmHWM is reset through /proc/self/clear_refs before
# each, and glibc is made to unmap freed buffers so that RSS follows the live tensors.
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from nlft_kernels import linear_token_logprobs, nlft_linear_loss, nlft_loss

    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    rows, dim, chunk, vocabs = json.loads(sys.argv[1])
    torch.manual_seed(0)
    hidden = torch.randn(2, rows // 2, dim, requires_grad=True)
    correct = torch.ones(2, dtype=torch.bool)
    standard = -torch.rand(2, rows // 2)  # teacher views as label log-probs
    # One small call first: the first call of the process allocates what every later one reuses
    # (the kernels' thread pools, lazily built tables), which is no chunk's.
    warm, labels = torch.randn(2, 8, dim, requires_grad=True), torch.zeros(2, 8, dtype=torch.long)
    nlft_linear_loss(warm, torch.randn(16, dim), labels, correct, standard=-torch.rand(2, 8)).backward()
    extra = {}
    for path in ("fused", "teacher", "materialised"):
        for vocab in vocabs:
            weight = (torch.randn(vocab, dim) / dim**0.5).requires_grad_()
            labels = torch.randint(0, vocab, (2, rows // 2))
            Path("/proc/self/clear_refs").write_text("5")
            before = rss("VmRSS")
            if path == "teacher":
                out = linear_token_logprobs(hidden, weight, labels, chunk_size=chunk)
            else:
                if path == "fused":
                    loss = nlft_linear_loss(hidden, weight, labels, correct, standard=standard, chunk_size=chunk)
                else:
                    loss = nlft_loss(hidden @ weight.T, labels, correct, standard=standard)
                out = torch.autograd.grad(loss, (hidden, weight))
                del loss
            extra[f"{path} {vocab}"] = rss("VmHWM") - before
            del out, weight
    print(json.dumps(extra))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak RSS")
def test_peak_memory_is_bounded_by_a_chunk():
    """As V grows, the fused path's peak grows only by a chunk and weight-sized gradients (and
    linear_token_logprobs' by a chunk); the materialised path's grows with N x V."""
    rows, dim, chunk, vocabs = 2048, 32, 32, (2048, 16384)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, json.dumps([rows, dim, chunk, vocabs])],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    extra = json.loads(out.stdout.strip().splitlines()[-1])
    report = {name: f"{value / (1 << 20):.1f} MiB" for name, value in extra.items()}
    for vocab in vocabs:
        # a few [chunk, V] float32 temporaries, float32 weight gradients, the hidden gradient
        bound = 6 * chunk * vocab * 4 + 3 * vocab * dim * 4 + 2 * rows * dim * 4 + (16 << 20)
        assert extra[f"fused {vocab}"] <= bound, f"fused peak above {bound >> 20} MiB: {report}"
        teacher_bound = 4 * chunk * vocab * 4 + (16 << 20)
        assert extra[f"teacher {vocab}"] <= teacher_bound, f"teacher peak above {teacher_bound >> 20} MiB: {report}"
    logits_growth = rows * (vocabs[1] - vocabs[0]) * 4
    fused_growth = extra[f"fused {vocabs[1]}"] - extra[f"fused {vocabs[0]}"]
    materialised_growth = extra[f"materialised {vocabs[1]}"] - extra[f"materialised {vocabs[0]}"]
    assert materialised_growth >= logits_growth, report
    assert fused_growth <= logits_growth / 4, report
    assert extra[f"teacher {vocabs[1]}"] - extra[f"teacher {vocabs[0]}"] <= logits_growth / 8, report


def test_weight_gradient_is_rounded_once():
    """The weight gradient sums the chunks in float32 and is rounded to bfloat16 once, as
    F.linear's backward over all rows: with 40 chunks (and the fix-up of the rows the 6% rule
    zeroes) its error against float64 is that of one rounding of the exact G.T @ hidden (G the
    logits gradient in bfloat16), where adding each chunk's product in bfloat16 would round 40
    times (emulated here: clearly worse)."""
    case = make_linear_case(torch.bfloat16, seed=61, batch=4, steps=40, vocab=64, dim=32)
    config = NLFTConfig(cluster_criterion="off")
    _, (_, dw, _) = fused(case, case.standard, case.judge, config=config, chunk_size=4)[:2]
    exact_params = [p.detach().double().requires_grad_() for p in params(case)]
    logits = linear_logits(exact_params, torch.bfloat16).detach().requires_grad_()
    loss = nlft_loss_reference(logits, case.labels, case.correct, case.standard, case.judge, config)
    (g,) = torch.autograd.grad(loss, logits)
    g, h = g.reshape(-1, g.shape[-1]).to(torch.bfloat16), case.hidden.detach().reshape(g.numel() // 64, -1)
    exact = g.double().T @ h.double()
    once = exact.to(torch.bfloat16)
    per_chunk = torch.zeros_like(once)
    for start in range(0, g.shape[0], 4):
        per_chunk.addmm_(g[start : start + 4].T, h[start : start + 4])

    def error(x):
        return float((x.double() - exact).abs().max() / exact.abs().max())

    assert error(per_chunk) > 2 * error(once), "the inputs do not tell one rounding from forty"
    assert error(dw) <= 1.25 * error(once), (error(dw), error(once), error(per_chunk))


class WeightedCrossEntropyRows:
    """A row pass for the chunk driver (``linear_chunks.linear_pass``), written against its
    contract only: a token-weighted cross-entropy ``sum_t w_t * CE_t``, its per-row losses kept
    on the side, the gradient ``w_t * (softmax - onehot)`` written over the chunk's logits."""

    def __init__(self, labels: torch.Tensor, weights: torch.Tensor) -> None:
        self.labels, self.weights = labels, weights
        self.losses = torch.zeros(labels.numel(), dtype=torch.float64)
        self.chunks = 0

    def __call__(self, chunk) -> torch.Tensor:
        x = chunk.logits.double()
        labels, weights = self.labels[chunk.rows], self.weights[chunk.rows]
        lse = torch.logsumexp(x, -1)
        self.losses[chunk.rows] = weights * (lse - x.gather(1, labels[:, None])[:, 0])
        grad = torch.softmax(x, -1)
        grad[torch.arange(len(labels)), labels] -= 1
        chunk.logits.copy_(grad * weights[:, None])
        self.chunks += 1
        return chunk.logits


@pytest.mark.parametrize("chunk_size", [7, 64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_driver_runs_any_row_pass(dtype, bias, chunk_size):
    """The driver's contract with another row pass (the token-weighted cross-entropy of issue
    21 item 5): the gradients of hidden, weight and bias equal float64 autograd on F.linear's
    logits, and the loss terms are the row pass's own, one call per chunk."""
    g = generator(seed_of("chunk driver", dtype, bias, chunk_size))
    rows, dim, vocab = 50, 12, 37
    hidden = torch.randn(rows, dim, generator=g).to(dtype)
    weight = (torch.randn(vocab, dim, generator=g) / dim**0.5).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (rows,), generator=g)
    weights = torch.rand(rows, generator=g, dtype=torch.float64) * (torch.rand(rows, generator=g) > 0.2)
    row_pass = WeightedCrossEntropyRows(labels, weights)
    grads = linear_module.linear_pass(hidden, weight, b, row_pass, (True, True, bias), chunk_size)

    exact = [p.double().requires_grad_() for p in (hidden, weight, b) if p is not None]
    logits = linear_logits(exact, dtype)
    ref = weights * torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    ref_grads = torch.autograd.grad(ref.sum(), exact)
    # (a 16-bit GEMM may round a logit to the neighbour of the exact product's rounding)
    torch.testing.assert_close(row_pass.losses, ref.detach(), rtol=LOSS_RTOL, atol=LOSS_RTOL)
    assert row_pass.chunks == math.ceil(rows / chunk_size)
    grad_rtol, atol_fraction = LINEAR_GRAD_TOL[dtype]
    for grad, ref_grad in zip(grads[: len(exact)], ref_grads, strict=True):
        assert grad.dtype == dtype
        torch.testing.assert_close(
            grad.double(), ref_grad, rtol=grad_rtol, atol=atol_fraction * float(ref_grad.abs().max())
        )
    assert (grads[2] is None) == (not bias)
