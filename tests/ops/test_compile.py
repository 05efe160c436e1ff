"""torch.compile(fullgraph=True) of the fused losses equals eager (loss and gradients).

The package's ops (``nlft_kernels.ops.loss_ops`` / ``linear_ops``, the same eagerly and
compiled) are checked by ``torch.library.opcheck`` (schema, fake implementation, dispatch); each
public function is compiled with ``aot_eager`` (fast: the ops, their autograd Functions and the
surrounding torch code traced into one graph) and, once all together, with ``inductor``
(generated C++; slow on the CPU, so one small graph). Inputs are small but exercise every
branch: correct and wrong samples, saliency tokens of both kinds, padding, clusters.
"""

from __future__ import annotations

import pytest
import torch

from nlft_kernels import NLFTConfig, linear_token_logprobs, nlft_linear_loss, nlft_loss, token_logprobs
from nlft_kernels.ops.contracts import GradStore, ViewMode
from nlft_kernels.ops.linear_ops import (
    LinearTokenLogprobsArgs,
    NLFTLinearLossArgs,
    linear_token_logprobs_op,
    nlft_linear_loss_op,
)
from nlft_kernels.ops.loss_ops import (
    NLFTLossArgs,
    TokenLogprobsArgs,
    config_args,
    nlft_loss_inplace_op,
    nlft_loss_op,
    token_logprobs_op,
)
from tests._inputs import generator, make_inputs, seed_of
from tests.conftest import NEEDS_TRITON

B, T, V, D = 4, 9, 33, 16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(*key, dtype=torch.float32):
    return make_inputs(B, T, V, dtype=dtype, seed=seed_of(*key), hidden_dim=D)


def _assert_exercised(details, x):
    """The inputs reach what the comparison is about: both kinds of saliency, padding, clusters."""
    valid = x.labels != -100
    assert bool((~valid).any()) and bool(x.correct.any()) and bool((~x.correct).any())
    assert bool((details.saliency & x.correct[:, None]).any()), "no saliency token in a correct sample"
    assert bool(details.unlikelihood.any()), "no saliency token in a wrong sample"


def _run(fn, leaves, *args):
    """(outputs, gradients of ``leaves``) of ``fn(*leaves, *args)`` summed to a scalar."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves, *args)
    loss = out if out.dim() == 0 else (out * torch.linspace(0.5, 1.5, out.numel()).view(out.shape)).sum()
    loss.backward()
    return out.detach(), [t.grad for t in leaves]


def _compare(fn, leaves, *args, backend="aot_eager", rtol=0.0, atol=0.0):
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got, got_grads = _run(compiled, leaves, *args)
    want, want_grads = _run(fn, leaves, *args)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert w is not None and bool(w.abs().sum() > 0)
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# The custom ops themselves


def test_opcheck_token_logprobs():
    x = _inputs("opcheck_token_logprobs")
    args = TokenLogprobsArgs(x.base.detach(), x.labels.reshape(-1), -100, "auto", True)
    torch.library.opcheck(token_logprobs_op, tuple(args))


@pytest.mark.parametrize("reduction", ["sample_mean", "none"])
@pytest.mark.parametrize("grad", [GradStore.FORWARD, GradStore.BACKWARD, GradStore.NONE], ids=lambda g: g.name)
def test_opcheck_nlft_loss(reduction, grad):
    x = _inputs("opcheck_nlft_loss", reduction)
    rule, ignore, criterion = config_args(NLFTConfig())
    args = NLFTLossArgs(
        base=x.base.detach(),
        standard=x.standard.detach(),
        standard_mode=int(ViewMode.LOGITS),
        judge=x.judge.detach(),
        judge_mode=int(ViewMode.LOGITS),
        labels=x.labels.reshape(-1),
        sample_ids=torch.arange(B).repeat_interleave(T),
        correct=x.correct,
        hidden=x.hidden.reshape(B * T, D),
        rule=rule,
        ignore_index=ignore,
        criterion=criterion,
        reduction=reduction,
        backend="auto",
        validate=True,
        grad=int(grad),
        vocab=V,
        group="",
        offset=0,
    )
    torch.library.opcheck(nlft_loss_op, tuple(args))
    if grad == GradStore.FORWARD:  # the in-place variant writes the gradient into the base logits
        torch.library.opcheck(nlft_loss_inplace_op, tuple(args._replace(base=x.base.detach().clone())))


@pytest.mark.parametrize("reduction", ["sample_mean", "none"])
def test_opcheck_nlft_linear_loss(reduction):
    x = _inputs("opcheck_nlft_linear_loss", reduction)
    g = generator(seed_of("opcheck_linear_head", reduction))
    hidden = x.hidden.reshape(B * T, D)
    weight = torch.randn(V, D, generator=g)
    bias = torch.randn(V, generator=g)
    labels = x.labels.reshape(-1)
    standard = torch.randn(B * T, generator=g) - 3
    rule, ignore, criterion = config_args(NLFTConfig())
    args = NLFTLinearLossArgs(
        hidden=hidden, weight=weight, bias=bias, standard=standard, standard_mode=int(ViewMode.LOGPROBS),
        judge=standard - 1, judge_mode=int(ViewMode.LOGPROBS), labels=labels,
        sample_ids=torch.arange(B).repeat_interleave(T), correct=x.correct, rule=rule, ignore_index=ignore,
        criterion=criterion, reduction=reduction, backend="auto", validate=True, rows=8, clusters=True, steps=T,
        want=[True, True, True],
    )  # fmt: skip
    torch.library.opcheck(nlft_linear_loss_op, tuple(args))
    lp_args = LinearTokenLogprobsArgs(hidden, weight, None, labels, -100, 8, "auto", True)
    torch.library.opcheck(linear_token_logprobs_op, tuple(lp_args))


# ---------------------------------------------------------------------------------------------
# Public functions under torch.compile(fullgraph=True, backend="aot_eager"): bit-equal to eager


# (backend of the loss, teachers as logits or label log-probs, reduction, clusters)
LOSS_CASES = [
    pytest.param("auto", "logits", "sample_mean", True, id="cpp-logits-clusters"),
    pytest.param("auto", "logprobs", "none", False, id="cpp-logprobs-none"),
    pytest.param("torch", "logits", "token_mean", True, id="torch-logits-token_mean"),
    pytest.param("triton", "logits", "sample_mean", False, id="triton-interpreted", marks=NEEDS_TRITON),
]


@pytest.mark.parametrize("backend, teachers, reduction, clusters", LOSS_CASES)
def test_nlft_loss_compiles(backend, teachers, reduction, clusters):
    x = _inputs("nlft_loss_compiles", backend, teachers, reduction, clusters)
    if teachers == "logprobs":
        standard = token_logprobs(x.standard, x.labels).detach()
        judge = token_logprobs(x.judge, x.labels).detach()
    else:
        standard, judge = x.standard, x.judge
    hidden = x.hidden if clusters else None

    def fn(base):
        return nlft_loss(
            base, x.labels, x.correct, standard=standard, judge=judge, hidden_states=hidden,
            reduction=reduction, backend=backend,
        )  # fmt: skip

    _, details = nlft_loss(
        x.base, x.labels, x.correct, standard=standard, judge=judge, hidden_states=hidden, return_details=True
    )
    _assert_exercised(details, x)
    assert not clusters or bool(details.cluster.any())
    _compare(fn, [x.base])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_inplace_grad_compiles(dtype):
    """inplace_grad=True on logits made inside the graph (the LM head's output): the mutating op
    traces, and loss and gradients equal eager's (float16: the gradient written in backward)."""
    x = _inputs("inplace_compiles", dtype)
    weight, _ = _head("inplace_compiles_head")

    def fn(hidden, weight):
        logits = (hidden @ weight.T).to(dtype)
        return nlft_loss(logits, x.labels, x.correct, standard=x.standard, judge=x.judge, inplace_grad=True)

    _compare(fn, [x.hidden, weight], rtol=1e-6, atol=1e-6)


def test_nlft_loss_compiles_bf16_without_judge():
    x = _inputs("nlft_loss_compiles_bf16", dtype=torch.bfloat16)
    correct = torch.ones(B, dtype=torch.bool)

    def fn(base):
        return nlft_loss(base, x.labels, correct, standard=x.standard)

    _compare(fn, [x.base])


def test_compiled_nlft_loss_still_requires_the_judge():
    """The one check that runs even with validate=False moves into the op: still raised."""
    x = _inputs("compiled_requires_judge")
    fn = torch.compile(lambda base: nlft_loss(base, x.labels, x.correct, standard=x.standard), fullgraph=True,
                       backend="aot_eager")  # fmt: skip
    with pytest.raises(ValueError, match="judge is required"):
        fn(x.base)


def test_token_logprobs_compiles():
    x = _inputs("token_logprobs_compiles")
    _compare(lambda logits: token_logprobs(logits, x.labels), [x.base])
    _compare(lambda logits: token_logprobs(logits.reshape(B * T, V), x.labels.reshape(-1)), [x.base])


def _head(*key):
    g = generator(seed_of(*key))
    return torch.randn(V, D, generator=g) / D**0.5 * 4, torch.randn(V, generator=g)


@pytest.mark.parametrize("reduction", ["sample_mean", "none"])
@pytest.mark.parametrize("chunk_size", [8, None], ids=["chunk8", "auto"])
def test_nlft_linear_loss_compiles(reduction, chunk_size):
    x = _inputs("linear_compiles", reduction, chunk_size)
    weight, bias = _head("linear_compiles_head", reduction, chunk_size)
    config = NLFTConfig(correct_threshold=0.3, ratio_threshold=1.05, judge_min_prob=0.0)
    # Sharper teachers than the base: saliency tokens of both kinds in a random head.
    std_w = 4 * weight
    judge_w = 2 * weight + torch.randn(V, D, generator=generator(1))
    # Labels the teacher of each kind of sample prefers: the standard view's for correct
    # samples, the judge's for wrong ones (padding kept).
    teacher = torch.where(x.correct[:, None, None], x.hidden @ std_w.T, x.hidden @ judge_w.T)
    x.labels = torch.where(x.labels == -100, -100, (teacher + bias).argmax(-1))

    def fn(hidden, weight, bias):
        standard = linear_token_logprobs(hidden.detach(), std_w, x.labels, bias.detach(), chunk_size=chunk_size)
        judge = linear_token_logprobs(hidden.detach(), judge_w, x.labels, bias.detach(), chunk_size=chunk_size)
        return nlft_linear_loss(
            hidden, weight, x.labels, x.correct, standard=standard, judge=judge, bias=bias, config=config,
            reduction=reduction, chunk_size=chunk_size,
        )  # fmt: skip

    standard = linear_token_logprobs(x.hidden, std_w, x.labels, bias)
    judge = linear_token_logprobs(x.hidden, judge_w, x.labels, bias)
    _, details = nlft_linear_loss(
        x.hidden, weight, x.labels, x.correct, standard=standard, judge=judge, bias=bias, config=config,
        return_details=True,
    )  # fmt: skip
    _assert_exercised(details, x)
    _compare(fn, [x.hidden, weight, bias])


# ---------------------------------------------------------------------------------------------
# Inductor: the three ops in one small graph (one C++ compile)


def test_inductor_all_ops():
    x = _inputs("inductor_all_ops")
    weight, bias = _head("inductor_head")

    def fn(base, hidden, weight):
        standard = linear_token_logprobs(hidden.detach(), weight.detach(), x.labels)
        lp = token_logprobs(base, x.labels)
        core = nlft_loss(base, x.labels, x.correct, standard=x.standard, judge=x.judge, hidden_states=x.hidden)
        linear = nlft_linear_loss(hidden, weight, x.labels, x.correct, standard=standard, judge=lp.detach())
        return core + linear + 0.1 * lp.sum()

    _compare(fn, [x.base, x.hidden, weight], backend="inductor", rtol=1e-5, atol=1e-5)
