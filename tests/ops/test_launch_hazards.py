"""What the interpreter hides and a GPU would not forgive: tile sizes, reads out of bounds,
fp16 underflow, silent mistraining and a second [N, V] buffer in backward.

Triton runs on CUDA tensors where a GPU is (benchmarks.gpu_suite's tests step), else on CPU
tensors under the interpreter; the float64 references run on the CPU."""

import dataclasses

import pytest
import torch

import nlft_kernels.ops.launch as launch_module
from nlft_kernels import nlft_loss, token_logprobs
from nlft_kernels.ops.launch import FAMILIES, LaunchConfig, launch_config, vocab_bucket
from nlft_kernels.reference import nlft_loss_reference
from tests._inputs import NLFTInputs, generator, make_inputs, seed_of
from tests.conftest import backend_device, backend_params, dtype_params
from tests.tolerances import assert_grad_close, assert_loss_close

# Every backend of the registry, each on its device (Triton and CUDA on a GPU where there is one).
BACKENDS = backend_params(gpu_too=True)
pytestmark = pytest.mark.gpu_too


def on_device(x: NLFTInputs, backend: str) -> NLFTInputs:
    """``x`` where ``backend`` computes (``backend_device``): CUDA tensors for Triton on a GPU and
    for the CUDA kernel, else as made (CPU)."""
    device = backend_device(backend)
    moved = {f.name: getattr(x, f.name).detach().to(device) for f in dataclasses.fields(x)}
    moved["base"].requires_grad_()
    return NLFTInputs(**moved)


@pytest.mark.parametrize("dtype", dtype_params(torch.bfloat16, torch.float16, torch.float32, torch.float64))
@pytest.mark.parametrize("streams", [1, 2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_tiles_are_powers_of_two_at_every_vocabulary(family, streams, dtype):
    """Every vocabulary from 1 to 300,000 (and the real ones): a power-of-two tile, no larger
    than the vocabulary's power of two, within the register budget of the streams."""
    vocabs = list(range(1, 5000)) + list(range(5000, 300_000, 997)) + [32000, 50257, 128256, 151936, 256000]
    for vocab in vocabs:
        cfg = launch_config(family, vocab, streams, dtype)
        assert cfg.block_v & (cfg.block_v - 1) == 0, (vocab, cfg)
        assert cfg.block_v <= max(vocab_bucket(vocab), launch_module.MIN_BLOCK_V)
        assert cfg.block_v * streams * dtype.itemsize <= 4 * 16384 or cfg.block_v == launch_module.MIN_BLOCK_V


def test_tuned_entries_override_the_rule_and_must_be_powers_of_two(monkeypatch):
    key = ("row_pass", vocab_bucket(50257), 3, "bfloat16")
    monkeypatch.setitem(launch_module.TUNED, key, LaunchConfig(2048, 4))
    assert launch_config("row_pass", 50257, 3, torch.bfloat16) == LaunchConfig(2048, 4)
    assert launch_config("row_pass", 50257, 2, torch.bfloat16) != LaunchConfig(2048, 4)
    with pytest.raises(ValueError, match="power of two"):
        LaunchConfig(5461, 8)
    with pytest.raises(ValueError, match="family"):
        launch_config("nope", 100, 1, torch.float32)


@pytest.mark.parametrize("standard_form", ["logits", "logprobs"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_out_of_range_read_nothing_outside_the_row(backend, standard_form):
    """validate=False skips the label check: a label outside [0, V) that is not ignore_index
    gives NaN log-probs, a NaN gradient row and no saliency in its row (so a NaN loss), never a
    read past the row, as the compiled kernels do (tests/csrc); other rows stay exact."""
    x = make_inputs(4, 6, 97, seed=seed_of("labels out of range", backend, standard_form))
    dev = on_device(x, backend).base.device
    labels = x.labels.clone()
    bad = [(0, 1, 97), (1, 0, 97 + 1000), (2, 2, -5)]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for b, t, value in bad:
        labels[b, t] = value
        mask[b, t] = True
    good = ~mask & (labels != -100)
    expected = torch.log_softmax(x.base.detach().double(), -1).gather(-1, labels.clamp(0, 96)[..., None])[..., 0]
    standard = x.standard
    if standard_form == "logprobs":  # finite teachers: the row's coefficient must still be NaN
        lp_s = torch.log_softmax(x.standard.double(), -1).gather(-1, labels.clamp(0, 96)[..., None])[..., 0]
        standard = torch.where(mask, -0.01, lp_s)  # p_s > 0.95: would be salient
    base = x.base.detach().to(dev).requires_grad_()
    loss, details = nlft_loss(
        base,
        labels.to(dev),
        x.correct.to(dev),
        standard=standard.to(dev),
        judge=x.judge.to(dev),
        backend=backend,
        validate=False,
        reduction="none",
        return_details=True,
    )
    (grad,) = torch.autograd.grad(loss, base, torch.ones_like(loss))
    loss, grad, details = (
        loss.cpu(),
        grad.cpu(),
        dataclasses.replace(details, **{f.name: getattr(details, f.name).cpu() for f in dataclasses.fields(details)}),
    )
    assert details.logprob_base[mask].isnan().all() and loss[mask].isnan().all()
    assert grad[mask].isnan().all(), "the whole gradient row of a bad label is NaN"
    assert not grad[~mask].isnan().any() and not details.saliency[mask].any()
    if standard_form == "logits":
        assert details.logprob_standard[mask].isnan().all()
    assert_loss_close(details.logprob_base[good], expected[good])
    assert not details.logprob_base[~mask].isnan().any()

    logits = x.base.detach().to(dev).requires_grad_()
    lp = token_logprobs(logits, labels.to(dev), backend=backend, validate=False)
    (grad,) = torch.autograd.grad(lp, logits, torch.ones_like(lp))  # no one-hot past the row
    lp, grad = lp.cpu(), grad.cpu()
    assert lp[mask].isnan().all()
    assert_loss_close(lp[good], expected[good])
    assert not grad[good].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_samples_without_judge_are_never_trained_as_correct(backend):
    """Without a judge, wrong samples are refused (validate=True), or, unvalidated (no host
    sync), their rows make the loss and their gradient NaN: never silently trained as correct."""
    x = on_device(make_inputs(4, 6, 50, seed=seed_of("no judge", backend)), backend)
    assert not x.correct.all()
    with pytest.raises(ValueError, match="judge is required"):
        nlft_loss(x.base, x.labels, x.correct, standard=x.standard, backend=backend)
    loss = nlft_loss(x.base, x.labels, x.correct, standard=x.standard, backend=backend, validate=False)
    assert loss.isnan()
    (grad,) = torch.autograd.grad(loss, x.base)
    wrong_rows = (~x.correct[:, None] & (x.labels != -100)).cpu()
    assert grad.cpu().isnan().all(-1).equal(wrong_rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_gradient_survives_loss_scaling(backend):
    """GradScaler multiplies the loss by its factor (2**16 at first, lowered while the gradient
    overflows) and the gradient arrives scaled by it in backward: the stored rows must not have
    underflowed in fp16 before that."""
    x = make_inputs(2, 4, 4000, seed=seed_of("fp16 underflow", backend))
    d = on_device(x, backend)
    base = (d.base.detach() * 4).half().requires_grad_()  # wide logits: tiny softmax entries
    scale = 2.0**12  # the largest entries stay below fp16's maximum
    loss = nlft_loss(base, d.labels, d.correct, standard=d.standard.half(), judge=d.judge.half(), backend=backend)
    (grad,) = torch.autograd.grad(loss * scale, base)
    grad = grad.cpu()
    ref_base = base.detach().cpu().double().requires_grad_()
    ref = nlft_loss_reference(ref_base, x.labels, x.correct, x.standard.half(), x.judge.half())
    (ref_grad,) = torch.autograd.grad(ref * scale, ref_base)
    # 0 in fp16 before scaling (below half its smallest subnormal), representable after it.
    tiny = (ref_grad.abs() / scale < 2.0**-25) & (ref_grad.abs() > 2.0**-22)
    assert tiny.sum() > 100, "the inputs must have gradient entries that underflow fp16 before scaling"
    assert grad.dtype == torch.float16
    assert (grad[tiny] != 0).all(), "entries underflowed to 0 before the loss scale applied"
    assert_grad_close(grad, ref_grad, torch.float16)


@pytest.mark.parametrize("reduction", ["sample_mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_the_saved_gradient_in_place(backend, reduction):
    """grad_output != 1 (gradient accumulation, loss scaling) multiplies the stored [N, V]
    gradient where it is: the returned gradient is that buffer, no second one. A second backward
    through the same forward (retain_graph=True) rescales it to its own grad_output."""
    x = make_inputs(4, 6, 64, seed=seed_of("in place", backend, reduction))
    d = on_device(x, backend)
    loss = nlft_loss(
        d.base, d.labels, d.correct, standard=d.standard, judge=d.judge, backend=backend, reduction=reduction
    )
    node = loss.grad_fn
    while not hasattr(node, "saved_tensors"):  # "none" reshapes the per-row loss: a view node first
        node = node.next_functions[0][0]
    saved, _factor = node.saved_tensors
    ref_base = x.base.detach().double().requires_grad_()
    ref = nlft_loss_reference(ref_base, x.labels, x.correct, x.standard, x.judge, reduction=reduction)
    for scale in (0.25, -3.0):
        grad_out = torch.full_like(loss, scale) if reduction == "none" else torch.tensor(scale)
        (grad,) = torch.autograd.grad(loss, d.base, grad_out.to(loss.device), retain_graph=True)
        assert grad.data_ptr() == saved.data_ptr()
        (ref_grad,) = torch.autograd.grad(ref, ref_base, grad_out.double(), retain_graph=True)
        assert_grad_close(grad.cpu(), ref_grad, torch.float32)


def test_linear_backward_scales_the_saved_gradients_in_place():
    """nlft_linear_loss stores the hidden and weight gradients in forward; grad_output != 1
    multiplies them where they are (no second [V, D] weight gradient); a second backward
    rescales them to its own grad_output."""
    from nlft_kernels import nlft_linear_loss

    g = generator(seed_of("linear in place"))
    hidden = torch.randn(3, 5, 16, generator=g).requires_grad_()
    weight = torch.randn(200, 16, generator=g).requires_grad_()
    labels = torch.randint(0, 200, (3, 5), generator=g)
    correct = torch.tensor([True, False, True])
    teacher = torch.randn(3, 5, generator=g).clamp(max=0) - 0.1

    def loss():
        return nlft_linear_loss(hidden, weight, labels, correct, standard=teacher, judge=teacher, backend="torch")

    ones = torch.autograd.grad(loss(), (hidden, weight))
    scaled = loss()
    saved = scaled.grad_fn.saved_tensors
    for scale in (0.25, 2.0):
        grads = torch.autograd.grad(scaled, (hidden, weight), torch.tensor(scale), retain_graph=True)
        assert [t.data_ptr() for t in grads] == [t.data_ptr() for t in saved[:2]]
        for got, want in zip(grads, ones, strict=True):
            torch.testing.assert_close(got, scale * want)
