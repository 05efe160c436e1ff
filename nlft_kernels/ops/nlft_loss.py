"""The fused NLFT loss of base logits: ``nlft_loss``.

Every token's loss has a gradient of the same form in the base logits,
``coef * (softmax(x_b) - onehot(y))``, with ``coef = w + nll_weight`` (correct response),
``w`` (wrong response, ordinary token) or ``-w * p_b / (1 - p_b)`` (unlikelihood), times a
row scale that holds ``loss_scale`` and the reduction's normalisation (``1 / n`` of the
sample). So one program per row computes the three log-softmax statistics online, decides
saliency and the weight, and writes the gradient row in a second sweep of the same launch
(the row pass of a backend, ``ops/kernels.py`` for Triton); a small second stage on [N]-sized
statistics decides the per-sample rules (``ops/stages.py``).

Layers, one file each: ``tl_utils`` (Triton helpers) -> ``kernels`` (Triton kernels and
launchers), ``torch_rows`` / ``extension_ops`` (the other backends) -> ``row_rule`` (the
torch row rule) -> ``stages`` -> ``functions`` (autograd) -> ``nlft_loss`` /
``nlft_linear_loss`` / ``token_logprobs`` (public), with ``inputs`` the one input-preparation
step and ``contracts`` the names shared with the kernels and ``csrc/``.
"""

from __future__ import annotations

import torch

from nlft_kernels.backends import resolve_backend
from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.custom_ops import nlft_loss_apply
from nlft_kernels.ops.functions import NLFTLossFunction
from nlft_kernels.ops.inputs import (
    REDUCTIONS,
    NLFTDetails,
    as_3d,
    check_options,
    nlft_outputs,
    prepare_nlft_inputs,
)
from nlft_kernels.ops.stages import NLFTLossParams
from nlft_kernels.ops.vocab_parallel import nlft_loss_vocab_parallel

__all__ = ["REDUCTIONS", "NLFTDetails", "nlft_loss"]


def nlft_loss(
    base_logits: torch.Tensor,
    labels: torch.Tensor,
    correct: torch.Tensor,
    *,
    standard: torch.Tensor,
    judge: torch.Tensor | None = None,
    config: NLFTConfig = NLFTConfig(),
    reduction: str = "sample_mean",
    sample_ids: torch.Tensor | None = None,
    hidden_states: torch.Tensor | None = None,
    return_details: bool = False,
    backend: str = "auto",
    validate: bool = True,
    vocab_parallel_group=None,
):
    """The NLFT loss (see the spec), fused: no [N, V] temporary besides the base gradient.

    base_logits: [B, T, V] (or flat rows [N, V] with ``sample_ids``) float32/bf16/fp16, the
      trained view; ``logits[b, t]`` predicts ``labels[b, t]``.
    labels: [B, T] (or [N]) int64, ``config.ignore_index`` marks padding.
    correct: [B] (or [S] samples) bool, whether each sample's response is correct.
    standard, judge: teacher views, [B, T, V] logits or [B, T] label log-probs (no gradient);
      ``judge`` is required when any sample is wrong.
    sample_ids: [N] int64 sample of each flat row, non-decreasing.
    hidden_states: [B, T, D] (or [N, D]) base-view states, for saliency clusters.
    reduction: ``"sample_mean"`` (the spec: mean over samples with tokens of
      ``loss_scale * sum_t loss_t / n``), ``"token_mean"``, ``"sum"`` or ``"none"`` (per-token
      ``loss_scale * loss_t`` shaped like ``labels``; ``sum`` and ``token_mean`` reduce it).
    return_details: also return an :class:`NLFTDetails` of per-token tensors.
    backend: ``"auto"`` (on the CPU the compiled C++ kernel when ``nlft_kernels._C`` is built,
      else chunked torch; on CUDA Triton or the CUDA kernel, see ``nlft_kernels.backends``),
      ``"triton"``, ``"cuda"``, ``"cpp"``, ``"torch"``.
    validate: check label range, finiteness and wrong samples' judge (a few host syncs); off
      while ``torch.compile`` traces the call (see ``nlft_kernels.ops.custom_ops``).
    vocab_parallel_group: a process group over which the vocabulary is split (Megatron's
      layout, see ``nlft_kernels.ops.vocab_parallel``): ``base_logits`` and teacher logits are
      this rank's columns [r * V / P, (r + 1) * V / P); labels stay global ids. PyTorch ops,
      ``backend`` is not used.
    """
    check_options(config, reduction)
    compiling = torch.compiler.is_compiling()
    validate = validate and not compiling
    if vocab_parallel_group is not None:
        return nlft_loss_vocab_parallel(
            base_logits, labels, correct, standard, judge, config, reduction, sample_ids, hidden_states,
            return_details, validate, vocab_parallel_group,
        )  # fmt: skip
    inputs = prepare_nlft_inputs(base_logits, labels, correct, standard, judge, config, reduction, sample_ids, validate)
    inputs.views.base = as_3d(base_logits, "base_logits")
    if hidden_states is not None:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.shape[:-1] != inputs.shape:
            raise ValueError(
                f"hidden_states must have shape {tuple(inputs.shape)} + (D,), "
                f"got {tuple(getattr(hidden_states, 'shape', ()))}"
            )
        if hidden_states.device != base_logits.device:
            raise ValueError(f"hidden_states is on {hidden_states.device} but base_logits is on {base_logits.device}")
    if not compiling:  # the op resolves it while compiling
        backend = resolve_backend(backend, base_logits.device, inputs.views.labels.numel(), base_logits.shape[-1])
    params = NLFTLossParams(
        inputs.views, inputs.sample_ids, inputs.correct, hidden_states, config, reduction, backend, validate,
        torch.is_grad_enabled(),
    )  # fmt: skip
    apply = nlft_loss_apply if compiling else NLFTLossFunction.apply
    loss, *details = apply(base_logits, params)
    return nlft_outputs(loss, details, inputs.shape, reduction, return_details)
