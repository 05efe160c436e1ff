"""nlft_loss on every path (Triton under the interpreter, chunked torch, the C++ kernel) against the float64
reference."""

import pytest
import torch

import nlft_kernels.ops.loss_ops as loss_ops_module
from nlft_kernels import NLFTConfig, nlft_loss
from nlft_kernels.reference import REDUCTIONS, nlft_loss_reference
from tests._inputs import KINDS, generator, make_inputs, seed_of
from tests.conftest import LOW_PRECISION, backend_params, dtype_params, shape_params
from tests.tolerances import assert_grad_close, assert_loss_close, assert_no_worse_than_torch

# Every backend of the registry that computes on CPU tensors (skipped here with its reason).
BACKENDS = backend_params()
DTYPES = dtype_params(torch.float32, torch.bfloat16)
DETAIL_FLAGS = ("saliency", "unlikelihood", "cluster", "killed")
DETAIL_VALUES = ("logprob_base", "logprob_standard", "logprob_judge", "weight", "token_loss")


def teacher(x, view: torch.Tensor, form: str) -> torch.Tensor:
    """A teacher view as logits or as [B, T] label log-probs (float64, exact)."""
    if form == "logits":
        return view
    safe = x.labels.clamp(min=0)
    return torch.log_softmax(view.double(), -1).gather(-1, safe[..., None]).squeeze(-1)


def run_both(
    x, reduction="sample_mean", backend="torch", forms=("logits", "logits"), hidden=False, grad_out=None, config=None
):
    """(loss, grad, details) of ours and of the reference on the same inputs."""
    config = NLFTConfig() if config is None else config
    standard, judge = teacher(x, x.standard, forms[0]), teacher(x, x.judge, forms[1])
    h = x.hidden if hidden else None
    base = x.base.detach().clone().requires_grad_()
    common = dict(
        standard=standard, judge=judge, config=config, reduction=reduction, hidden_states=h, return_details=True
    )
    loss, details = nlft_loss(base, x.labels, x.correct, backend=backend, **common)
    ref_base = x.base.detach().double().requires_grad_()
    ref, ref_details = nlft_loss_reference(ref_base, x.labels, x.correct, **common)
    if grad_out is None and reduction == "none":
        g = generator(seed_of("grad_out", tuple(ref.shape)))
        grad_out = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    elif grad_out is None:
        grad_out = torch.tensor(1.0, dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, base, grad_out.to(loss.dtype))
    (ref_grad,) = torch.autograd.grad(ref, ref_base, grad_out)
    return (loss, grad, details), (ref, ref_grad, ref_details)


def assert_exercised(ref_details, correct: torch.Tensor, clusters: bool = False) -> None:
    """The inputs hit every branch: correct-sample saliency, unlikelihood, the 6% rule firing on
    one wrong sample and not on another that has a saliency token, and ordinary tokens of both."""
    saliency, killed = ref_details["saliency"], ref_details["killed"]
    assert saliency[correct].any(), "no saliency token in a correct sample"
    assert ref_details["unlikelihood"].any(), "no unlikelihood token"
    assert killed.any(dim=1).any(), "the 6% rule never fired"
    spared = ~correct & saliency.any(dim=1) & ~killed.any(dim=1)
    assert spared.any(), "no wrong sample keeps its ordinary tokens while having a saliency token"
    ordinary = ~saliency & ~killed & (ref_details["token_loss"] != 0)
    assert ordinary[correct].any() and ordinary[~correct].any(), "ordinary tokens missing"
    if clusters:
        assert ref_details["cluster"][correct].any() and ref_details["cluster"][~correct].any()


def assert_details(details, ref_details, labels: torch.Tensor, correct: torch.Tensor) -> None:
    """Every detail on the response rows (the judge's log-prob only where it is used: wrong samples)."""
    for name in DETAIL_FLAGS:
        assert torch.equal(getattr(details, name), ref_details[name]), name
    valid = labels != -100
    for name in DETAIL_VALUES:
        rows = valid & ~correct[:, None] if name == "logprob_judge" else valid
        assert_loss_close(getattr(details, name)[rows], ref_details[name][rows])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, reduction, dtype):
    # V=300: one partial tile; tests/ops/test_real_vocabularies.py runs many tiles.
    x = make_inputs(8, 20, 300, dtype=dtype, seed=seed_of("nlft_loss", backend, reduction, dtype))
    (loss, grad, details), (ref, ref_grad, ref_details) = run_both(x, reduction, backend)
    assert_exercised(ref_details, x.correct)
    assert_loss_close(loss, ref)
    assert_grad_close(grad, ref_grad, dtype)
    assert_details(details, ref_details, x.labels, x.correct)
    if dtype in LOW_PRECISION:
        own_loss, own_grad = torch_in_dtype(x, reduction, dtype)
        assert_no_worse_than_torch(loss, ref, own_loss, dtype, "loss")
        assert_no_worse_than_torch(grad, ref_grad, own_grad, dtype, "gradient")


def torch_in_dtype(x, reduction: str, dtype: torch.dtype):
    """(loss, gradient) of the reference computed by torch in ``dtype`` itself (CCE's yardstick),
    with run_both's gradient of the output."""
    base = x.base.detach().clone().requires_grad_()
    loss = nlft_loss_reference(base, x.labels, x.correct, x.standard, x.judge, reduction=reduction, dtype=dtype)
    if reduction == "none":
        g = generator(seed_of("grad_out", tuple(loss.shape)))
        grad_out = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(dtype)
    else:
        grad_out = torch.ones((), dtype=dtype)
    (grad,) = torch.autograd.grad(loss, base, grad_out)
    return loss, grad


@pytest.mark.parametrize("forms", [("logprobs", "logprobs"), ("logits", "logprobs"), ("logprobs", "logits")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_views_as_logprobs(backend, forms):
    x = make_inputs(8, 20, 257, seed=11)
    (loss, grad, details), (ref, ref_grad, ref_details) = run_both(x, "sample_mean", backend, forms)
    assert_exercised(ref_details, x.correct)
    assert_loss_close(loss, ref)
    assert_grad_close(grad, ref_grad, torch.float32)
    assert_details(details, ref_details, x.labels, x.correct)


@pytest.mark.parametrize("criterion", ["distance", "similarity"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_saliency_clusters_in_the_loss(backend, criterion):
    x = make_inputs(8, 20, 200, seed=5)
    config = NLFTConfig(cluster_criterion=criterion, cluster_threshold=0.4)
    (loss, grad, details), (ref, ref_grad, ref_details) = run_both(x, backend=backend, hidden=True, config=config)
    assert_exercised(ref_details, x.correct, clusters=True)
    assert_loss_close(loss, ref)
    assert_grad_close(grad, ref_grad, torch.float32)
    assert_details(details, ref_details, x.labels, x.correct)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", shape_params("T=1", "partial tile", "padding"))
def test_shapes(backend, shape):
    """T = 1, V well above and below the tile, a V of 64 (a power of two) with padding rows."""
    x = make_inputs(*shape, seed=sum(shape))
    assert (x.labels == -100).any() == (shape[1] > 1), "every sample of T > 1 but the first has padding"
    (loss, grad, details), (ref, ref_grad, ref_details) = run_both(x, "sample_mean", backend)
    assert_loss_close(loss, ref)
    assert_grad_close(grad, ref_grad, torch.float32)
    assert_details(details, ref_details, x.labels, x.correct)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_rows_with_sample_ids(backend):
    """[N, V] rows of the valid tokens only, with sample_ids, equal the padded [B, T, V] form."""
    x = make_inputs(8, 20, 300, seed=3)
    valid = x.labels != -100
    sample_ids = torch.arange(8)[:, None].expand(8, 20)[valid]
    flat = x.base.detach()[valid].clone().requires_grad_()
    loss, details = nlft_loss(
        flat,
        x.labels[valid],
        x.correct,
        standard=x.standard[valid],
        judge=x.judge[valid],
        sample_ids=sample_ids,
        backend=backend,
        return_details=True,
    )
    (_, _, _), (ref, ref_grad, ref_details) = run_both(x, "sample_mean", "torch")
    assert_exercised(ref_details, x.correct)
    assert_loss_close(loss, ref)
    loss.backward()
    assert_grad_close(flat.grad, ref_grad[valid], torch.float32)
    assert torch.equal(details.saliency, ref_details["saliency"][valid])
    assert torch.equal(details.killed, ref_details["killed"][valid])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_logits_are_read_in_place(backend):
    """logits[:, :-1] (rows not contiguous across samples) gives the same loss and gradient."""
    x = make_inputs(6, 12, 150, seed=9)
    extra = torch.randn(6, 1, 150, generator=generator(seed_of("sliced", backend)))
    wide = torch.cat([x.base.detach(), extra], dim=1).requires_grad_()
    sliced = wide[:, :-1]
    assert not sliced.is_contiguous()
    loss = nlft_loss(sliced, x.labels, x.correct, standard=x.standard, judge=x.judge, backend=backend)
    (loss_c, grad_c, _), _ = run_both(x, "sample_mean", backend)
    assert_loss_close(loss, loss_c)
    loss.backward()
    assert_grad_close(wide.grad[:, :-1], grad_c, torch.float32)
    assert not wide.grad[:, -1].any()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding_gives_zero_loss_and_zero_gradient(backend, reduction):
    x = make_inputs(3, 5, 100, seed=1)
    labels = torch.full_like(x.labels, -100)
    loss = nlft_loss(
        x.base, labels, x.correct, standard=x.standard, judge=x.judge, reduction=reduction, backend=backend
    )
    assert not loss.any()
    (grad,) = torch.autograd.grad(loss.sum(), x.base)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_samples_do_not_count_in_the_sample_mean(backend):
    x = make_inputs(8, 20, 120, seed=4)
    x.labels[1] = -100
    (loss, grad, _), (ref, ref_grad, _) = run_both(x, "sample_mean", backend)
    assert_loss_close(loss, ref)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_correct_without_judge(backend):
    x = make_inputs(4, 10, 90, seed=2)
    correct = torch.ones(4, dtype=torch.bool)
    loss = nlft_loss(x.base, x.labels, correct, standard=x.standard, backend=backend)
    ref = nlft_loss_reference(x.base.detach().double(), x.labels, correct, x.standard)
    assert_loss_close(loss, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scales_the_gradient(backend):
    x = make_inputs(4, 20, 100, seed=6)
    (loss, grad, _), (ref, ref_grad, _) = run_both(x, "token_mean", backend, grad_out=torch.tensor(-2.5).double())
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("case", ["no_grad", "detached", "with grad"])
def test_no_gradient_work_without_requires_grad(case, monkeypatch):
    """Under torch.no_grad() or with detached logits the [N, V] gradient is never computed."""
    x = make_inputs(4, 10, 90, seed=2)
    asked = []
    real = loss_ops_module.first_stage
    monkeypatch.setattr(
        loss_ops_module,
        "first_stage",
        lambda v, cfg, backend, grad, out=None: asked.append(grad) or real(v, cfg, backend, grad, out),
    )
    base = x.base.detach() if case == "detached" else x.base
    with torch.set_grad_enabled(case != "no_grad"):
        loss = nlft_loss(base, x.labels, x.correct, standard=x.standard, judge=x.judge)
    assert asked == [case == "with grad"]
    assert (loss.grad_fn is None) == (case != "with grad")
    assert_loss_close(loss, nlft_loss_reference(x.base.detach().double(), x.labels, x.correct, x.standard, x.judge))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend):
    x = make_inputs(4, 20, 80, seed=8)
    before = [t.detach().clone() for t in (x.base, x.standard, x.judge, x.labels, x.correct, x.hidden)]
    loss = nlft_loss(
        x.base, x.labels, x.correct, standard=x.standard, judge=x.judge, hidden_states=x.hidden, backend=backend
    )
    loss.backward()
    for old, new in zip(before, (x.base, x.standard, x.judge, x.labels, x.correct, x.hidden), strict=True):
        assert torch.equal(old, new.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_views_get_no_gradient(backend):
    x = make_inputs(4, 20, 80, seed=8)
    standard = x.standard.clone().requires_grad_()
    judge = x.judge.clone().requires_grad_()
    loss = nlft_loss(x.base, x.labels, x.correct, standard=standard, judge=judge, backend=backend)
    loss.backward()
    assert standard.grad is None and judge.grad is None and x.base.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    """Finite differences see every dependence on the base logits, while the spec detaches the
    unlikelihood weight 2 sigmoid(p_j / p_b - theta): so gradcheck runs where that weight does not
    occur (correct samples, wrong samples without saliency). The unlikelihood gradient is checked
    against the reference's autograd in the tests above."""
    x = make_inputs(3, 6, 17, dtype=torch.float64, seed=12)
    judge = x.base.detach() - 3.0  # p_j = p_b: r1 = 1, never salient
    correct = torch.tensor([True, False, True])
    _, details = nlft_loss(x.base, x.labels, correct, standard=x.standard, judge=judge, return_details=True)
    assert details.saliency[0].any() and not details.unlikelihood.any()
    fn = lambda base: nlft_loss(base, x.labels, correct, standard=x.standard, judge=judge, backend=backend)
    assert torch.autograd.gradcheck(fn, (x.base,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_every_kind_of_sample_is_built():
    assert KINDS == ("correct", "wrong_many", "wrong_one", "wrong_none")


# --------------------------------------------------------------------------------------------
# Errors


def _args(**overrides):
    x = make_inputs(2, 4, 10, seed=0)
    args = dict(base_logits=x.base, labels=x.labels, correct=x.correct, standard=x.standard, judge=x.judge)
    args.update(overrides)
    return args


def _call(args):
    args = dict(args)
    return nlft_loss(args.pop("base_logits"), args.pop("labels"), args.pop("correct"), **args)


def _with(tensor, index, value):
    tensor = tensor.detach().clone()
    tensor[index] = value
    return tensor


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(base_logits=torch.zeros(2, 4, 3, 10)), "base_logits"),
        (dict(base_logits=torch.zeros(2, 4, 10, dtype=torch.long)), "base_logits"),
        (dict(base_logits=torch.zeros(2, 0, 10)), "base_logits"),
        (dict(labels=torch.zeros(2, 5, dtype=torch.long)), "labels"),
        (dict(labels=torch.zeros(2, 4)), "labels"),
        (dict(labels=torch.full((2, 4), 10)), "labels"),
        (dict(labels=torch.full((2, 4), -5)), "labels"),
        (dict(correct=torch.ones(3, dtype=torch.bool)), "correct"),
        (dict(correct=torch.ones(2)), "correct"),
        (dict(correct=[True, False]), "correct"),
        (dict(standard=torch.zeros(2, 4, 11)), "standard"),
        (dict(standard=torch.zeros(2, 4, dtype=torch.long)), "standard"),
        (dict(standard=torch.empty(2, 4, 10, device="meta")), "standard"),
        (dict(standard=None), "standard"),
        (dict(judge=None), "judge"),
        (dict(judge=torch.zeros(2, 5)), "judge"),
        (dict(sample_ids=torch.zeros(2, 4, dtype=torch.long)), "sample_ids"),
        (dict(hidden_states=torch.zeros(2, 5, 3)), "hidden_states"),
        (dict(reduction="mean"), "reduction"),
        (dict(config={"loss_scale": 1.0}), "config"),
        (dict(backend="cuda-graphs"), "backend"),
    ],
)
def test_bad_input_names_the_argument(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(_args(**overrides))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name, index, value",
    [
        ("base_logits", (0, 1, 3), float("nan")),
        ("base_logits", (1, 2, 0), float("inf")),
        ("standard", (0, 0, 2), float("nan")),
        ("judge", (1, 0, 5), float("inf")),
    ],
)
def test_non_finite_logits_name_the_view(backend, name, index, value):
    args = _args(backend=backend)
    args[name] = _with(args[name], index, value)
    with pytest.raises(ValueError, match=name):
        _call(args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_at_a_label_is_an_error_elsewhere_allowed(backend):
    args = _args(backend=backend)
    labels = args["labels"]
    masked = _with(args["base_logits"], (0, 0, (labels[0, 0] + 1) % 10), float("-inf"))
    _call(dict(args, base_logits=masked))  # a masked vocabulary entry is fine
    at_label = _with(args["base_logits"], (0, 0, labels[0, 0]), float("-inf"))
    with pytest.raises(ValueError, match="base_logits"):
        _call(dict(args, base_logits=at_label))


def test_flat_rows_need_valid_sample_ids():
    x = make_inputs(2, 4, 10, seed=0)
    flat = dict(
        base_logits=x.base.reshape(8, 10),
        labels=x.labels.reshape(8),
        correct=x.correct,
        standard=x.standard.reshape(8, 10),
        judge=x.judge.reshape(8, 10),
    )
    with pytest.raises(ValueError, match="sample_ids"):
        _call(flat)
    with pytest.raises(ValueError, match="sample_ids"):
        _call(dict(flat, sample_ids=torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])))
    with pytest.raises(ValueError, match="sample_ids"):
        _call(dict(flat, sample_ids=torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])))
    _call(dict(flat, sample_ids=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])))


def test_triton_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _call(_args(backend="triton"))


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16))
@pytest.mark.parametrize("name", ["standard", "judge"])
def test_teacher_logprobs_above_zero_name_the_view(name, dtype):
    """A [B, T] teacher must hold log-probs (<= 0): logits or a flipped sign are refused, while
    values at 0 up to their dtype's rounding pass."""
    x = make_inputs(4, 6, 40, seed=seed_of("teacher above 0", name, dtype))
    views = {"standard": teacher(x, x.standard, "logprobs"), "judge": teacher(x, x.judge, "logprobs")}
    views = {k: v.to(dtype) for k, v in views.items()}
    assert (views[name] <= 0).all()
    rounded = dict(views, **{name: views[name].clamp(max=0) + 2 * torch.finfo(dtype).eps})
    nlft_loss(x.base, x.labels, x.correct, **rounded)  # rounding above 0 is accepted
    flipped = dict(views, **{name: -views[name]})
    with pytest.raises(ValueError, match=f"{name} given as \\[B, T\\] label log-probs must be <= 0"):
        nlft_loss(x.base, x.labels, x.correct, **flipped)
    nlft_loss(x.base, x.labels, x.correct, **flipped, validate=False)  # unchecked when asked
