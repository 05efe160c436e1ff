"""nlft_kernels.backends: what "auto" picks, the errors of a forced backend that cannot run, and
what backends() reports, including for a missing or broken compiled extension."""

import importlib
import importlib.machinery
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlft_kernels import backends, nlft_loss
from nlft_kernels.backends import resolve_backend
from tests._inputs import generator, make_inputs, seed_of

# The module (the package's attribute ``backends`` is the report function).
backends_module = importlib.import_module("nlft_kernels.backends")

ROOT = Path(__file__).resolve().parents[1]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def no_extension(monkeypatch):
    why = "nlft_kernels._C is not built (test)"
    monkeypatch.setattr(backends_module, "extension", lambda: (None, why))
    return why


def test_auto_on_cpu_is_cpp_exactly_when_the_extension_loads():
    module, _ = backends_module.extension()
    assert resolve_backend("auto", CPU) == ("cpp" if module is not None else "torch")


def test_auto_on_cpu_falls_back_to_torch(no_extension):
    assert resolve_backend("auto", CPU) == "torch"
    assert backends()["cpp"] == f"unavailable: {no_extension}"


@pytest.mark.parametrize(
    "backend, device, match",
    [
        ("cpp", CUDA, "backend='cpp' needs CPU tensors"),
        ("cuda", CPU, "backend='cuda' needs CUDA tensors"),
        ("fused", CPU, "backend must be one of"),
    ],
)
def test_forced_backend_on_the_wrong_device(backend, device, match):
    with pytest.raises(ValueError, match=match):
        resolve_backend(backend, device)


@pytest.mark.parametrize(
    "triton_version, numpy_version, runs",
    [("3.6.0", "2.4.6", False), ("3.2.0", "2.4.0", False), ("3.6.0", "2.3.5", True), ("3.7.0", "2.4.6", True)],
)
def test_interpreter_refused_where_it_cannot_run_the_kernels(triton_version, numpy_version, runs):
    """Triton < 3.7's interpreter with NumPy >= 2.4 fails on the kernels' loop bounds read from
    memory (triton-lang/triton#9171): the registry says so instead of an InterpreterError."""
    why = backends_module.interpreter_unavailable(triton_version, numpy_version)
    assert (why is None) == runs
    if not runs:
        assert f"Triton {triton_version} with NumPy {numpy_version}" in why and "numpy<2.4" in why


def test_interpreter_reason_reaches_the_user(monkeypatch):
    """A forced backend='triton' on CPU tensors raises the reason (the versions installed here
    replaced by an affected pair)."""
    versions = {"triton": "3.6.0", "numpy": "2.4.6"}
    monkeypatch.setattr(backends_module.importlib.metadata, "version", versions.__getitem__)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"backend='triton' cannot run under the interpreter of Triton 3\.6\.0"):
        resolve_backend("triton", CPU)


def test_forced_cpp_without_extension_says_why(no_extension):
    with pytest.raises(ValueError, match=r"backend='cpp' is unavailable: nlft_kernels\._C is not built \(test\)"):
        resolve_backend("cpp", CPU)
    x = make_inputs(2, 4, 10, seed=0)
    with pytest.raises(ValueError, match="backend='cpp' is unavailable"):
        nlft_loss(x.base, x.labels, x.correct, standard=x.standard, judge=x.judge, backend="cpp")


def test_forced_cuda_says_why():
    """On a machine whose _C has no CUDA kernel, or without a GPU, the reason is given."""
    why = backends_module._cuda_unavailable()
    if why is None:
        pytest.skip("the CUDA kernel can run here")
    with pytest.raises(ValueError, match="backend='cuda' is unavailable: .+"):
        resolve_backend("cuda", CUDA)
    assert backends()["cuda"] == f"unavailable: {why}"


def test_gpu_choice_table(monkeypatch):
    """auto on CUDA tensors: the first GPU_CHOICE entry whose limits hold, else GPU_DEFAULT; a
    "cuda" entry falls back to the default where the CUDA kernel cannot run."""
    assert resolve_backend("auto", CUDA, 1024, 32000) == backends_module.GPU_DEFAULT
    monkeypatch.setattr(backends_module, "GPU_CHOICE", ((2048, 50000, "cuda"), (10**9, 10**9, "triton")))
    monkeypatch.setattr(backends_module, "GPU_DEFAULT", "triton")
    monkeypatch.setattr(backends_module, "_cuda_unavailable", lambda: None)
    assert resolve_backend("auto", CUDA, 1024, 32000) == "cuda"
    assert resolve_backend("auto", CUDA, 8192, 32000) == "triton"
    assert resolve_backend("auto", CUDA) == "triton"  # no shape: the default
    monkeypatch.setattr(backends_module, "_cuda_unavailable", lambda: "no CUDA device")
    assert resolve_backend("auto", CUDA, 1024, 32000) == "triton"


def test_report_names_every_backend_with_a_reason():
    report = backends()
    assert set(report) == {"triton", "cuda", "cpp", "torch", "auto"}
    for name in ("triton", "cuda", "cpp", "torch"):
        state = report[name]
        assert state.startswith("available") or (state.startswith("unavailable: ") and len(state) > 20), state


# A copy of the Python package with a chosen _C and build record, imported in a fresh process.
_PROBE = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
import nlft_kernels
b = importlib.import_module("nlft_kernels.backends")
assert nlft_kernels.__file__.startswith(sys.argv[1]), nlft_kernels.__file__
importlib.import_module("nlft_kernels.extension")._installed_file = lambda prefix: None  # this copy only
import torch
from tests._inputs import generator, make_inputs, seed_of
x = make_inputs(2, 4, 10, seed=0)
loss = nlft_kernels.nlft_loss(x.base, x.labels, x.correct, standard=x.standard, judge=x.judge)
print(json.dumps({"report": nlft_kernels.backends(), "auto": b.resolve_backend("auto", torch.device("cpu")),
                  "loss": float(loss)}))
"""


def _probe(tmp_path: Path, so_bytes: bytes | None, info: dict | None) -> dict:
    package = tmp_path / "nlft_kernels"
    skip = shutil.ignore_patterns("*.so", "*.pyd", "_build_info.json", "__pycache__")
    shutil.copytree(ROOT / "nlft_kernels", package, ignore=skip)
    if so_bytes is not None:
        (package / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(so_bytes)
    if info is not None:
        (package / "_build_info.json").write_text(json.dumps(info))
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_broken_extension_is_reported_not_raised(tmp_path):
    """A _C that does not load (here: not a shared object; in life, one built against another
    torch) leaves ``import nlft_kernels`` working, auto on the torch path, and the reason in
    backends(), with the torch it was built against."""
    info = {"extension": "built", "reason": "", "torch": "0.0.1", "cuda": False}
    out = _probe(tmp_path, b"not a shared object", info)
    assert out["auto"] == "torch"
    cpp = out["report"]["cpp"]
    assert cpp.startswith("unavailable: nlft_kernels._C does not load (ImportError"), cpp
    assert f"built against torch 0.0.1, this is torch {torch.__version__}" in cpp
    assert "pip install --force-reinstall --no-deps ." in cpp
    assert out["loss"] > 0


def test_extension_left_out_at_install_is_reported(tmp_path):
    """An install without _C (isolated build, no compiler, failed build) reports setup.py's reason."""
    info = {"extension": "not built", "reason": "no C++ compiler: 'c++' is not on PATH", "torch": None, "cuda": False}
    out = _probe(tmp_path, None, info)
    assert out["auto"] == "torch"
    assert out["report"]["cpp"] == "unavailable: nlft_kernels._C was not built at install: " + info["reason"]
    assert out["report"]["cuda"] == out["report"]["cpp"]


def test_installed_extension_found_behind_a_checkout_egg_info(tmp_path, monkeypatch):
    """`pip install .` in a checkout leaves nlft_kernels.egg-info there (no compiled file listed)
    ahead of site-packages on sys.path: the installed _C is still found."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    checkout, site = tmp_path / "checkout", tmp_path / "site"
    egg = checkout / "nlft_kernels.egg-info"
    egg.mkdir(parents=True)
    (egg / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: nlft-kernels\nVersion: 0.1.0\n")
    (egg / "SOURCES.txt").write_text("setup.py\nnlft_kernels/__init__.py\n")
    dist = site / "nlft_kernels-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nlft-kernels\nVersion: 0.1.0\n")
    (dist / "RECORD").write_text(f"nlft_kernels/__init__.py,,\nnlft_kernels/_C{suffix},,\n")
    (site / "nlft_kernels").mkdir()
    (site / "nlft_kernels" / f"_C{suffix}").write_bytes(b"")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(checkout))  # the checkout first, as when pytest runs from it
    found = importlib.import_module("nlft_kernels.extension")._installed_file("_C.")
    assert found == str(site / "nlft_kernels" / f"_C{suffix}")


def test_every_op_reaches_its_backend_through_the_registry(monkeypatch):
    """The row pass, backward's scaling, the label log-probs and the gradient from a saved lse of
    every public op are the registry's entries: a recording entry for "torch" sees each call."""
    from nlft_kernels import linear_token_logprobs, nlft_linear_loss, token_logprobs
    from nlft_kernels.backends import REGISTRY, Backend

    real, calls = REGISTRY["torch"], []

    def record(name):
        def call(*args, **kwargs):
            calls.append(name)
            return getattr(real, name)(*args, **kwargs)

        return call

    names = ("row_pass", "scale_rows", "label_logprobs", "softmax_grad", "label_logprobs_grad")
    monkeypatch.setitem(REGISTRY, "torch", Backend("torch", *(record(n) for n in names)))
    # Wrong samples whose saliency share passes the 6% rule: backward's one pass rescales rows.
    x = make_inputs(2, 12, 30, seed=5)
    loss, details = nlft_loss(
        x.base, x.labels, x.correct, standard=x.standard, judge=x.judge, backend="torch", return_details=True
    )
    loss.backward()
    assert details.killed.any(), "the inputs must make the second stage rescale rows"
    assert calls == ["row_pass", "scale_rows"]
    half = x.base.detach().half().requires_grad_()  # float16: the gradient is written in backward
    nlft_loss(half, x.labels, x.correct, standard=x.standard, judge=x.judge, backend="torch").backward()
    assert calls[2:] == ["row_pass", "softmax_grad"]
    lp = token_logprobs(x.base.detach().requires_grad_(), x.labels, backend="torch")
    lp.sum().backward()
    g = generator(seed_of("registry calls"))
    hidden, weight = torch.randn(2, 12, 8, generator=g), torch.randn(30, 8, generator=g)
    nlft_linear_loss(hidden, weight, x.labels, x.correct, standard=x.standard, judge=x.judge, backend="torch")
    linear_token_logprobs(hidden, weight, x.labels, backend="torch")
    assert {"label_logprobs", "softmax_grad"} <= set(calls)
    assert calls.count("row_pass") >= 3 and calls.count("label_logprobs") >= 2


def test_the_registry_names_every_backend_and_refuses_auto():
    from nlft_kernels.backends import BACKENDS, REGISTRY, implementation

    assert set(REGISTRY) == set(BACKENDS) - {"auto"}
    for name, entry in REGISTRY.items():
        assert entry.name == name
        assert all(callable(getattr(entry, f)) for f in ("row_pass", "scale_rows", "label_logprobs"))
    with pytest.raises(ValueError, match="once resolved"):
        implementation("auto")


def test_unavailable_gives_the_reason_resolve_backend_raises(no_extension):
    assert backends_module.unavailable("torch", CPU) is None
    why = backends_module.unavailable("cpp", CPU)
    assert why == f"is unavailable: {no_extension}"
    with pytest.raises(ValueError, match=f"backend='cpp' {why}".replace("(", r"\(").replace(")", r"\)")):
        resolve_backend("cpp", CPU)


def test_the_test_matrix_is_the_registry_gated_by_device(no_extension, monkeypatch):
    """tests/conftest.py's backend parameters: every registry backend in its order, each that
    cannot run here skipped with the registry's reason, unless the environment requires it."""
    from nlft_kernels.backends import REGISTRY
    from tests import conftest

    def skips(params):
        return {p.values[0]: [m.kwargs["reason"] for m in p.marks if m.name == "skip"] for p in params}

    monkeypatch.setattr(conftest, "REQUIRED_BACKENDS", set())
    matrix = skips(conftest.backend_params(gpu_too=True))
    assert list(matrix) == list(REGISTRY)
    for name, reasons in matrix.items():
        why = backends_module.unavailable(name, conftest.backend_device(name))
        assert reasons == ([] if why is None else [f"backend={name!r} {why}"]), name
    assert matrix["cpp"] == [f"backend='cpp' is unavailable: {no_extension}"] and not matrix["torch"]
    on_cpu = skips(conftest.backend_params())
    assert list(on_cpu) == [n for n in REGISTRY if n not in conftest.CPU_TENSORS_ONLY_EXCLUDED]
    monkeypatch.setattr(conftest, "REQUIRED_BACKENDS", {"cpp"})  # NLFT_REQUIRE_EXTENSION=1: run, and fail
    assert skips(conftest.backend_params())["cpp"] == []
