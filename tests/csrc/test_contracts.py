"""The names shared by Python and csrc/ agree: the view modes (``ViewMode`` and ``enum
ViewMode`` in csrc/nlft_row.h), the rule's constants (``RuleConstants``, the members of
``RowConfig``, the bindings' keyword arguments and the Triton row pass's parameters), and the
gradient passes of backward on ``_C``'s kernels (schemas and fake implementations)."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops import kernels
from nlft_kernels.ops.contracts import RuleConstants, ViewMode
from tests._inputs import generator, seed_of
from tests.csrc import extension_or_skip

CSRC = Path(__file__).resolve().parents[2] / "csrc"
RULE_FIELDS = [f.name for f in fields(RuleConstants)]


def _struct_members(header: str, struct: str) -> list[str]:
    body = re.search(rf"struct {struct} \{{(.*?)\}};", header, re.S).group(1)
    return re.findall(r"^\s*(?:double|int64_t)\s+(\w+);", body, re.M)


def test_view_modes_match_the_header():
    header = (CSRC / "nlft_row.h").read_text()
    body = re.search(r"enum ViewMode : int \{(.*?)\};", header, re.S).group(1)
    in_c = {name.upper(): int(value) for name, value in re.findall(r"kView(\w+)\s*=\s*(\d+)", body)}
    assert in_c == {mode.name: int(mode) for mode in ViewMode}


def test_rule_constants_match_row_config_bindings_and_kernel():
    """Every constant is passed by name: the struct, the binding and the kernel use the same names."""
    header = (CSRC / "nlft_row.h").read_text()
    assert sorted(_struct_members(header, "RowConfig")) == sorted(RULE_FIELDS)
    bindings = (CSRC / "bindings.cpp").read_text()
    first_stage = re.search(r'm\.def\("first_stage".*?\);', bindings, re.S).group(0)
    assert set(RULE_FIELDS) <= set(re.findall(r'py::arg\("(\w+)"\)', first_stage))
    # The binding fills RowConfig in the struct's order (an aggregate initialiser).
    fill = re.search(r"p\.cfg = \{(.*?)\};", bindings, re.S).group(1)
    assert [name.strip() for name in fill.split(",")] == _struct_members(header, "RowConfig")
    assert set(RULE_FIELDS) <= set(kernels._nlft_fwd_kernel.arg_names)


def test_rule_constants_of_a_config():
    cfg = NLFTConfig(ratio_threshold=2.0, judge_min_prob=0.0, correct_threshold=0.9, ignore_index=-1)
    rule = RuleConstants.of(cfg)
    assert rule.tau == 0.9 and rule.ignore_index == -1
    assert rule.log_ratio == pytest.approx(0.6931471805599453) and rule.log_judge_min == float("-inf")
    assert RuleConstants.from_floats(rule.floats(), rule.ignore_index) == rule


def test_gradient_pass_ops_pass_opcheck_on_the_cpp_backend():
    """Schemas, fake implementations and dispatch of backward's ops on the C++ kernels
    (``scale_grad_`` mutates the stored gradient and its factor; ``softmax_grad`` writes a new
    buffer, ``softmax_grad_`` the logits themselves)."""
    extension_or_skip()
    from nlft_kernels.ops.loss_ops import SoftmaxGradArgs, scale_grad_op, softmax_grad_inplace_op, softmax_grad_op

    g = generator(seed_of("opcheck gradient passes"))
    grad = torch.randn(10, 40, generator=g)
    factor = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 1.0, 1.0, 3.0, 0.0, 1.0])
    torch.library.opcheck(scale_grad_op, (grad, factor, torch.tensor(0.5), "cpp"))
    logits = torch.randn(2, 5, 40, generator=g)
    labels = torch.randint(0, 40, (10,), generator=g)
    labels[3] = -100
    lse = torch.logsumexp(logits.reshape(10, 40), -1)
    coef = torch.randn(10, generator=g)
    coef[6] = 0.0
    args = SoftmaxGradArgs(logits, labels, lse, coef, torch.tensor(2.0), -100, 0, "cpp")
    torch.library.opcheck(softmax_grad_op, tuple(args))
    torch.library.opcheck(softmax_grad_inplace_op, tuple(args._replace(logits=logits.clone())))
