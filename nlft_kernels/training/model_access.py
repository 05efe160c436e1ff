"""Reaching into a transformers causal LM through its wrappers: the model itself, its LM head, and
its decoder's final hidden states (what the head reads), without ever computing [B, L, V] logits.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without DDP/DataParallel, FSDP1 and DeepSpeed engine (``.module``) and torch.compile
    (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model`` (through DDP, torch.compile and peft wrappers;
    a peft model's LoRA layers stay in place and active)."""
    model = unwrap_model(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def output_embedding(model: nn.Module) -> nn.Module:
    """The module that maps ``model``'s final hidden states to logits (its LM head, tied or not),
    checked: no adapter on it, and logits that are ``hidden @ weight.T (+ bias)`` and nothing more."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings (LM head)")
    if hasattr(head, "base_layer"):
        raise ValueError("an adapter on the LM head is not supported: leave lm_head out of the LoRA target modules")
    config = getattr(lm, "config", None)
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, name, None) not in (None, 1.0):
            raise ValueError(f"models with {name} are not supported: their logits are not hidden @ lm_head.weight.T")
    return head


def lm_head_of(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, D], bias [V] or None) of the model's output embedding (:func:`output_embedding`)."""
    head = output_embedding(model)
    return head.weight, getattr(head, "bias", None)


@contextlib.contextmanager
def decoder_states(model: nn.Module) -> Iterator[tuple[list[torch.Tensor], dict]]:
    """Yields ``(captured, kwargs)``: while open, every call of ``model``'s decoder appends its
    final hidden states [B, L, D] to ``captured``; pass ``kwargs`` to the model's call
    (``logits_to_keep=1`` where the model accepts it keeps the head to one position)."""
    lm = causal_lm(model)
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = lm.get_decoder().register_forward_hook(hook)
    accepts = "logits_to_keep" in inspect.signature(lm.forward).parameters
    try:
        yield captured, ({"logits_to_keep": 1} if accepts else {})
    finally:
        handle.remove()


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states [B, L, D] (what the LM head reads) of ``model`` on a batch.

    The call goes through ``model`` itself (so DDP and peft hooks run); the states are taken
    by a forward hook on the decoder (:func:`decoder_states`).
    """
    with decoder_states(model) as (captured, kwargs):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder call per forward, saw {len(captured)}")
    return captured[0]
