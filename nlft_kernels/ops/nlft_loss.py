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
torch row rule) -> ``stages`` -> ``loss_ops`` / ``linear_ops`` (the ``torch.library`` ops,
declared by ``library``) -> ``autograd`` (one Function per loss) -> ``nlft_loss`` /
``nlft_linear_loss`` / ``token_logprobs`` (public), with ``inputs`` the one input-preparation
step and ``contracts`` the names shared with the kernels and ``csrc/``.
"""

from __future__ import annotations

import torch

from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.autograd import NLFTLossFunction
from nlft_kernels.ops.contracts import GradStore
from nlft_kernels.ops.inputs import (
    REDUCTIONS,
    NLFTDetails,
    NLFTInputs,
    as_3d,
    check_logits,
    check_options,
    nlft_outputs,
    prepare_nlft_inputs,
)
from nlft_kernels.ops.loss_ops import NLFTLossArgs, config_args
from nlft_kernels.ops.vocab_parallel import global_vocab, group_name, shard_range

__all__ = ["REDUCTIONS", "NLFTDetails", "nlft_loss"]


def check_inplace(logits: torch.Tensor, name: str) -> None:
    """``inplace_grad=True`` overwrites ``logits`` with its gradient: it must be the contiguous
    output of an op (the LM head's), not a leaf that requires grad (whose storage is a
    parameter or an input the caller keeps)."""
    if logits.is_leaf and logits.requires_grad:
        raise ValueError(
            f"inplace_grad=True overwrites {name} with its gradient: pass the output of the LM head (a "
            f"non-leaf tensor), not a leaf that requires grad"
        )
    if not logits.is_contiguous():
        raise ValueError(f"inplace_grad=True needs contiguous {name} (the gradient is written row after row)")


def op_fields(
    inputs: NLFTInputs, config: NLFTConfig, reduction: str, backend: str, validate: bool
) -> dict[str, object]:
    """The fields ``NLFTLossArgs`` and ``NLFTLinearLossArgs`` share: the checked views, labels and
    samples (view modes as ints: an op takes no enum), ``config`` as ``config_args`` gives it, and
    the call's options."""
    rule, ignore_index, criterion = config_args(config)
    views = {name: getattr(inputs, name) for name in ("standard", "judge", "labels", "sample_ids", "correct")}
    modes = {"standard_mode": int(inputs.standard_mode), "judge_mode": int(inputs.judge_mode)}
    options = {"reduction": reduction, "backend": backend, "validate": validate}
    return views | modes | {"rule": rule, "ignore_index": ignore_index, "criterion": criterion} | options


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
    inplace_grad: bool = False,
    vocab_parallel_group=None,
):
    """The NLFT loss (see the spec), fused: the gradient of the base logits is their only [N, V]
    buffer, written once in their dtype (or into their own storage with ``inplace_grad``).

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
    validate: check label range, sample ids, finiteness, teacher log-probs and wrong samples'
      judge (host syncs), eagerly and under ``torch.compile`` alike (inside the op). Off,
      nothing in the loss waits for the device (forward and backward: a CUDA graph can capture
      them); a wrong sample without a judge then gives a NaN loss.
    inplace_grad: write the gradient into ``base_logits``' own storage (Liger-Kernel's trick: no
      [N, V] gradient buffer). Safe when nothing else needs the logits' values after this call:
      neither the caller (they hold the gradient afterwards) nor another op's backward (a saved
      reference raises "modified by an inplace operation": the version counter moves). The
      logits must be contiguous and not a leaf that requires grad (the LM head's output is
      both). With float32/bf16 logits the forward overwrites them; with float16 (the gradient
      is computed in backward, see ``GradStore``) the backward does.
    vocab_parallel_group: a process group over which the vocabulary is split (Megatron's
      layout, see ``nlft_kernels.ops.vocab_parallel``): ``base_logits`` and teacher logits are
      this rank's columns [r * V / P, (r + 1) * V / P); labels stay global ids.
    """
    check_options(config, reduction)
    check_logits(base_logits, "base_logits")
    wanted = torch.is_grad_enabled() and base_logits.requires_grad
    if inplace_grad and wanted:
        check_inplace(base_logits, "base_logits")
    inputs = prepare_nlft_inputs(base_logits, labels, correct, standard, judge, sample_ids)
    hidden = None
    if hidden_states is not None:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.shape[:-1] != inputs.shape:
            raise ValueError(
                f"hidden_states must have shape {tuple(inputs.shape)} + (D,), "
                f"got {tuple(getattr(hidden_states, 'shape', ()))}"
            )
        if hidden_states.device != base_logits.device:
            raise ValueError(f"hidden_states is on {hidden_states.device} but base_logits is on {base_logits.device}")
        if config.cluster_criterion != "off":
            hidden = hidden_states.detach().reshape(inputs.labels.numel(), -1)
    vocab, group, offset = base_logits.shape[-1], "", 0
    if vocab_parallel_group is not None:
        vocab = global_vocab(base_logits.shape[-1], vocab_parallel_group)
        group = group_name(vocab_parallel_group)
        offset = shard_range(base_logits.shape[-1], vocab_parallel_group)[0]
    args = NLFTLossArgs(
        base=as_3d(base_logits.detach(), "base_logits"),
        hidden=hidden,
        grad=int(GradStore.of(base_logits.dtype, wanted, vocab_parallel_group is not None)),
        vocab=vocab,
        group=group,
        offset=offset,
        **op_fields(inputs, config, reduction, backend, validate),
    )
    loss, *details = NLFTLossFunction.apply(base_logits, args, inplace_grad and wanted)
    return nlft_outputs(loss, details, inputs.shape, reduction, return_details)
