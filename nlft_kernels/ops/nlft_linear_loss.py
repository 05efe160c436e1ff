"""The NLFT loss and teacher log-probs straight from hidden states: the [N, V] logits never exist.

``nlft_linear_loss(hidden, weight, ...)`` equals ``nlft_loss(F.linear(hidden, weight, bias), ...)``
(with ``hidden_states=hidden`` for the saliency clusters). The rows are processed in chunks by
the driver of ``ops/linear_chunks.py``: per chunk, the logits ``[c, V]`` are one GEMM in the
input dtype, the core op's first stage (Triton on CUDA, the C++ kernel or chunked torch
elsewhere) turns them into the label statistics and writes the gradient
``G_c = coef * (softmax - onehot)`` over them, and two more GEMMs fold ``G_c`` into the
gradients of ``hidden`` (``G_c @ weight``) and ``weight`` (``G_c.T @ hidden_c``, accumulated in
float32). Peak extra memory is one chunk's logits plus the gradients themselves. Chunks are
groups of whole samples, so the per-sample rule (the 6% rule, saliency clusters) is decided
before a chunk's gradient is folded in (``ops/linear_chunks.py`` says how, the bytes each
step moves, and how the rows per chunk are chosen).

The teachers' label log-probs (``linear_token_logprobs``) come from float32 logits tiles: the
saliency tests compare probabilities with 0.95 and ratios with 1.5, and a bfloat16 logit near
30 is off by up to 0.06, which moves a log-prob by as much and flips them.

As in Liger-Kernel's fused linear cross-entropy, the gradients are computed in forward and
backward only scales them (in place, skipped on the device where ``grad_output`` is 1); with
``reduction="none"`` the upstream gradient is per row, so forward keeps the statistics only
and backward makes a second chunked pass. The ops are ``ops/linear_ops.py``'s, the autograd
formula ``NLFTLinearLossFunction`` (``ops/autograd.py``), eagerly and compiled alike.
"""

from __future__ import annotations

import torch

from nlft_kernels.backends import resolve_backend
from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.autograd import NLFTLinearLossFunction
from nlft_kernels.ops.inputs import as_3d, check_labels, check_logits, check_options, nlft_outputs, prepare_nlft_inputs
from nlft_kernels.ops.linear_chunks import chunk_rows_for, flat_rows_2d, sample_groups
from nlft_kernels.ops.linear_ops import LinearTokenLogprobsArgs, NLFTLinearLossArgs, linear_token_logprobs_op
from nlft_kernels.ops.nlft_loss import nlft_loss, op_fields
from nlft_kernels.ops.vocab_parallel import global_vocab, linear_logits, shard_range, shard_statistics

__all__ = ["chunk_rows_for", "linear_token_logprobs", "nlft_linear_loss", "sample_groups"]

_DEFAULT_CONFIG = NLFTConfig()


# ---------------------------------------------------------------------------------------------
# Input checks shared by both public functions; nothing is computed before they pass.


def _checked_linear(hidden, weight, bias, chunk_size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check the linear inputs; returns them cast to the autocast dtype inside ``torch.autocast``
    (the matmuls then run in it, as ``F.linear`` would), so mixed dtypes are fine there."""
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor (the LM head, [V, D]), got {type(weight).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise ValueError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D [V, D] tensor (the LM head), got shape {tuple(weight.shape)}")
    if hidden.dim() not in (2, 3) or hidden.numel() == 0:
        raise ValueError(f"hidden must be a non-empty [B, T, D] or [N, D] tensor, got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden and weight must share the hidden size D: hidden has D={hidden.shape[-1]}, "
            f"weight [V, D] has D={weight.shape[1]}"
        )
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},), one entry per vocabulary row of weight, "
                f"got {tuple(bias.shape)}"
            )
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must have the same dtype")
    return hidden, weight, bias


def _logits_proxy(hidden: torch.Tensor, vocab: int) -> torch.Tensor:
    """A zero-byte tensor shaped like the logits [*hidden.shape[:-1], V], for the core op's checks."""
    return hidden.new_empty(()).expand(*hidden.shape[:-1], vocab)


def nlft_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    correct: torch.Tensor,
    *,
    standard: torch.Tensor,
    judge: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: NLFTConfig = _DEFAULT_CONFIG,
    reduction: str = "sample_mean",
    sample_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_details: bool = False,
    backend: str = "auto",
    validate: bool = True,
    vocab_parallel_group=None,
):
    """The NLFT loss of the base view's logits ``hidden @ weight.T + bias``, never materialised.

    Equals ``nlft_loss(hidden @ weight.T + bias, labels, correct, standard=..., judge=...,
    hidden_states=hidden, ...)`` in value and in the gradients of ``hidden``, ``weight`` and
    ``bias``: saliency clusters walk ``hidden`` unless ``config.cluster_criterion == "off"``.

    hidden: [B, T, D] (or flat rows [N, D] with ``sample_ids``) fp32/bf16/fp16, the base view's
      final hidden state; row ``[b, t]`` predicts ``labels[b, t]``.
    weight: [V, D] the LM head (tied embeddings are fine), same dtype as ``hidden``; bias: [V].
    labels, correct, standard, judge, sample_ids, reduction, return_details, backend, validate:
      as in :func:`nlft_loss`; pass the teacher views as [B, T] label log-probs
      (:func:`linear_token_logprobs`) to keep their logits out of memory too.
    chunk_size: rows per chunk; default from N, V, D and free memory (:func:`chunk_rows_for`):
      on CUDA long enough for the weight-gradient GEMM to be compute-bound (``compute_bound_rows``:
      over 1k rows at V=128256, D=4096 in bfloat16) up to twice that (1 GiB of logits for heads
      too narrow to be compute-bound), within free memory / 4; elsewhere within min(128 MiB,
      free memory / 4) and at most D / 2 rows. Peak extra memory is about
      ``chunk_size * V`` logits in the input dtype (every row pass writes their gradient over
      them; float16 adds a float32 gradient buffer, ``grad_dtype``) plus the gradients (hidden [N, D]; weight
      [V, D] and bias accumulated in float32, then cast to their dtype).

    Under ``torch.compile`` it traces as one op (``nlft_kernels::nlft_linear_loss``) and its
    autograd Function, as eagerly.

    vocab_parallel_group: the head's rows are split over this process group (Megatron's layout:
      ``weight`` [V / P, D] and ``bias`` are this rank's rows [r * V / P, (r + 1) * V / P);
      ``hidden`` and labels are the same on every rank). The logits shard [N, V / P] is
      materialised in the input dtype (``F.linear``), not chunked, and the hidden gradient is
      all-reduced over the group in backward (see ``nlft_kernels.ops.vocab_parallel``).
    """
    check_options(config, reduction)
    hidden, weight, bias = _checked_linear(hidden, weight, bias, chunk_size)
    if vocab_parallel_group is not None:
        logits = linear_logits(hidden, weight, bias, vocab_parallel_group)
        return nlft_loss(
            logits, labels, correct, standard=standard, judge=judge, config=config, reduction=reduction,
            sample_ids=sample_ids, hidden_states=hidden, return_details=return_details, backend=backend,
            validate=validate, vocab_parallel_group=vocab_parallel_group,
        )  # fmt: skip
    proxy = _logits_proxy(hidden, weight.shape[0])
    inputs = prepare_nlft_inputs(proxy, labels, correct, standard, judge, sample_ids, name="hidden @ weight.T")
    train = torch.is_grad_enabled()
    args = NLFTLinearLossArgs(
        hidden=flat_rows_2d(hidden).detach(),
        weight=weight.detach(),
        bias=None if bias is None else bias.detach(),
        rows=chunk_size or 0,
        clusters=config.cluster_criterion != "off",
        steps=inputs.shape[-1] if sample_ids is None else 0,
        want=[train and t is not None and t.requires_grad for t in (hidden, weight, bias)],
        **op_fields(inputs, config, reduction, backend, validate),
    )
    loss, *details = NLFTLinearLossFunction.apply(flat_rows_2d(hidden), weight, bias, args)
    return nlft_outputs(loss, details, inputs.shape, reduction, return_details)


@torch.no_grad()
def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    vocab_parallel_group=None,
) -> torch.Tensor:
    """log p(label) under ``hidden @ weight.T + bias``, chunked: for the teacher views.

    hidden: [B, T, D] or [N, D] fp32/bf16/fp16; weight: [V, D]; bias: [V] or None; labels:
    [B, T] or [N] int64. Returns float32 log-probs shaped like ``labels`` (0 at
    ``ignore_index``), without gradient, from float32 logits whatever the input dtype. Peak
    extra memory: a [chunk_size, V] float32 logits chunk, and for 16-bit inputs on a device
    without float32-output 16-bit matmuls (the CPU) a float32 copy of ``weight``.
    """
    hidden, weight, bias = _checked_linear(hidden, weight, bias, chunk_size)
    if vocab_parallel_group is not None:  # weight: this rank's rows (see nlft_linear_loss)
        check_logits(_logits_proxy(hidden, global_vocab(weight.shape[0], vocab_parallel_group)), "hidden @ weight.T")
        logits = as_3d(linear_logits(hidden, weight, bias, vocab_parallel_group, wide=True), "logits")
        labels = check_labels(labels, logits.view(*labels.shape, -1))
        flat = labels.reshape(-1)
        offset = shard_range(weight.shape[0], vocab_parallel_group)[0]
        lp, _ = shard_statistics(
            [logits], flat, offset, ignore_index, resolve_backend(backend, hidden.device), vocab_parallel_group
        )
        return torch.where(flat != ignore_index, lp[0], 0.0).view(labels.shape)
    proxy = _logits_proxy(hidden, weight.shape[0])
    check_logits(proxy, "hidden @ weight.T")
    labels = check_labels(labels, proxy)
    args = LinearTokenLogprobsArgs(
        hidden=flat_rows_2d(hidden),
        weight=weight,
        bias=bias,
        labels=labels.reshape(-1).contiguous(),
        ignore_index=ignore_index,
        rows=chunk_size or 0,
        backend=backend,
        validate=validate,
    )
    return linear_token_logprobs_op(*args).view(labels.shape)
