"""The LM head under engines that shard parameters: FSDP2, FSDP1, DeepSpeed ZeRO-3.

Under those engines the LM head's weight is whole only inside the forward of the module that
owns it: FSDP2 holds a sharded DTensor outside it, FSDP1 (``use_orig_params``) and ZeRO-3 a
flat shard or a size-0 placeholder. The fused loss reads the head's weight directly (the
[N, V] logits never exist), so it must run there: :func:`head_call` swaps the output
embedding's ``forward`` for the duration of one model call, for any transformers causal LM
with ``get_output_embeddings`` (no per-model patching). The swapped forward first computes the
logits the model asked for (``logits_to_keep=1``: one position), then calls the given function
with the head's weight and bias, whole, and keeps its result; gradients reach the unsharded
parameters inside the engine's forward, which the engine then reduces and reshards as it
does for any other layer. No gather is added: the engine's own unshard of the head is reused.

Every forward under these engines is a collective (each rank all-gathers each layer's
shards), so every rank must run the same forwards in the same order: the batch loss
(:mod:`nlft_kernels.training.batch_loss`) runs each view on every rank, through
:class:`nlft_kernels.training.heads.HeadInsideForward`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from nlft_kernels.training.model_access import decoder_states

PARAMETER_SHARDING = ("fsdp2", "fsdp1", "zero3")


def sharding_of(model: nn.Module) -> str | None:
    """Which engine shards ``model``'s parameters (one of ``PARAMETER_SHARDING``), or None
    (one process, DDP, DataParallel: the head's weight is whole everywhere)."""
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            return "fsdp1"
    for param in model.parameters():
        if _is_dtensor(param):
            return "fsdp2"
        if hasattr(param, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
            return "zero3"
    return None


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


@contextlib.contextmanager
def head_call(head: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor | None], object]) -> Iterator[list]:
    """While active, each call of ``head`` (the output embedding) also runs ``fn(weight, bias)``
    with the parameters as they are inside the call (whole under FSDP/ZeRO-3) and appends its
    result to the yielded list. The head still returns its usual output."""
    results: list = []
    original = head.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        results.append(fn(head.weight, getattr(head, "bias", None)))
        return out

    head.forward = forward
    try:
        yield results
    finally:
        del head.forward  # back to the class's forward


def gathered_head(head: nn.Module):
    """A context in which ``head``'s parameters are whole outside any forward: DeepSpeed's
    ``GatheredParameters`` for ZeRO-3 (modifier rank None: read only), else nothing. For loops
    that call :func:`nlft_kernels.nlft_linear_loss` themselves with a ZeRO-3 model and run
    backward inside the context; the batch loss does not need it (it computes inside the
    head's forward, where the engine reduces the head's gradient as any layer's)."""
    params = list(head.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def forward_with_head(model: nn.Module, head: nn.Module, input_ids, attention_mask, fn) -> object:
    """Run ``model`` on a batch and return ``fn(hidden, weight, bias)``, called inside the
    head's forward: ``hidden`` [B, L, D] the decoder's final states (what the head reads),
    ``weight``/``bias`` the head's parameters as they are there (whole under FSDP/ZeRO-3)."""
    with (
        decoder_states(model) as (captured, kwargs),
        head_call(head, lambda weight, bias: fn(captured[-1], weight, bias)) as results,
    ):
        output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    if len(captured) != 1 or len(results) != 1:
        raise RuntimeError(f"expected one decoder and one head call per forward, saw {len(captured)}, {len(results)}")
    result = results[0]
    if isinstance(result, torch.Tensor) and result.requires_grad:
        logits = output.logits if hasattr(output, "logits") else output[0]
        result = _ThroughOutput.apply(result, logits)
    return result


class _ThroughOutput(torch.autograd.Function):
    """``value`` unchanged, with the model's ``output`` as a second input whose gradient is zero.

    The loss is computed inside the head's forward and leaves the model by a side channel, so
    without this its gradient would reach the parameters without passing the model's output,
    where FSDP1 registers the hook that starts its backward (the root's state; otherwise its
    post-backward hook fails: "expected to be in states [FORWARD_BACKWARD] but current state
    is IDLE"). The zero gradient through ``output`` ([B, 1, V] with ``logits_to_keep=1``)
    adds nothing to any gradient."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        ctx.output = (output.shape, output.dtype, output.device)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.output
        return grad, torch.zeros((), dtype=dtype, device=device).expand(shape)
