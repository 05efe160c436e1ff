"""How the batch loss reaches the LM head: the one part of the NLFT batch loss that varies with
the way a model is run (:class:`HeadAccess`), chosen once from the model by :func:`head_access`.

- :class:`PlainHead`: the head's weight is whole in this process (one process, DDP,
  DataParallel, peft, torch.compile): the view runs, then the function reads the weight.
- :class:`HeadInsideForward`: the engine shards parameters (FSDP2, FSDP1, DeepSpeed ZeRO-3):
  the weight is whole only inside the head's own forward, so the function runs there
  (:func:`nlft_kernels.training.distributed.forward_with_head`), and every forward is a
  collective that every rank must run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

import torch
from torch import nn

from nlft_kernels.training.distributed import forward_with_head, sharding_of
from nlft_kernels.training.model_access import final_hidden, output_embedding, unwrap_model

T = TypeVar("T")
# fn(hidden [B, L, D] the decoder's final states, weight [V, D], bias [V] or None) -> its result.
HeadFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], T]


class HeadAccess(Protocol):
    """Runs one view of a batch through the model and hands its final hidden states, with the LM
    head's weight and bias whole, to a function."""

    collective: ClassVar[bool]  # every rank must run every forward, through the engine's wrapper
    device: torch.device  # where the head's weight lives: the batch goes there

    def forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, fn: HeadFn) -> T:
        """``fn(hidden, weight, bias)`` of ``model`` run on ``input_ids``/``attention_mask`` [B, L]."""
        ...

    def teacher(self, model: nn.Module) -> nn.Module:
        """The module the no-gradient views run through."""
        ...


@dataclass(frozen=True)
class PlainHead:
    """The head's ``weight`` [V, D] (and ``bias`` [V]) are whole in this process."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    collective: ClassVar[bool] = False

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def forward(self, model, input_ids, attention_mask, fn: HeadFn):
        return fn(final_hidden(model, input_ids, attention_mask), self.weight, self.bias)

    def teacher(self, model: nn.Module) -> nn.Module:
        # Past DDP: a view without gradient needs no gradient sync, so no collective for it.
        return unwrap_model(model)


@dataclass(frozen=True)
class HeadInsideForward:
    """The head module ``head``'s parameters are sharded: whole only inside its forward."""

    head: nn.Module
    collective: ClassVar[bool] = True

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, model, input_ids, attention_mask, fn: HeadFn):
        return forward_with_head(model, self.head, input_ids, attention_mask, fn)

    def teacher(self, model: nn.Module) -> nn.Module:
        return model  # through the engine: its forwards gather the shards


def head_access(model: nn.Module, lm_head: nn.Module | None = None) -> HeadAccess:
    """The :class:`HeadAccess` of ``model``: :class:`HeadInsideForward` when an engine shards its
    parameters (:func:`nlft_kernels.training.distributed.sharding_of`), else :class:`PlainHead`.
    ``lm_head``: the module that maps final hidden states to logits (default: the model's
    checked output embedding, :func:`nlft_kernels.training.model_access.output_embedding`)."""
    head = output_embedding(model) if lm_head is None else lm_head
    if sharding_of(model) is not None:
        return HeadInsideForward(head)
    return PlainHead(head.weight, getattr(head, "bias", None))
