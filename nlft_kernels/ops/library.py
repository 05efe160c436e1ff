"""The package's ``torch.library`` namespace and the one way its ops are declared.

An op's parameters are the fields of a NamedTuple (name and type); its outputs, those of
another (all tensors). ``define`` generates the schema from both, so the op's signature, the
tuple a caller builds and the tuple its implementation unpacks are one declaration: callers
build ``Args(...)`` by keyword and call ``op(*args)`` (which returns the tuple of ``Out``'s
tensors, or its one tensor), implementations receive ``Args`` and return ``Out``. Mutated
arguments are named in ``mutates`` (``Tensor(a!)`` in the schema).

Ops are declared with the low-level ``torch.library.Library`` API: a
``torch.library.custom_op`` runs its body under ``torch._disable_dynamo``, whose first call
imports dynamo (~900 modules, seconds) in every eager process. Autograd is not registered on
the ops: each loss has one ``torch.autograd.Function`` (``ops/autograd.py``) that calls them,
eagerly and under ``torch.compile`` alike (dynamo traces the Function, the ops stay opaque
nodes with their fake implementations); ``register_autograd`` cannot serve the in-place
variants, whose schema is not functional.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable

import torch
from torch import Tensor

LIB = torch.library.Library("nlft_kernels", "FRAGMENT")

_SCHEMA_TYPES: dict[object, str] = {
    Tensor: "Tensor",
    Tensor | None: "Tensor?",
    int: "int",
    float: "float",
    bool: "bool",
    str: "str",
    list[float]: "float[]",
    list[int]: "int[]",
    list[bool]: "bool[]",
}


def _schema_type(annotation) -> str:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = Tensor | None
    if annotation not in _SCHEMA_TYPES:
        raise TypeError(f"no torch.library schema type for {annotation!r}")
    return _SCHEMA_TYPES[annotation]


def schema(args: type, out: type | None, mutates: tuple[str, ...] = ()) -> str:
    """The schema ``(params) -> (outputs)`` of an op whose parameters are the fields of the
    NamedTuple ``args`` and whose outputs are the (tensor) fields of ``out`` (None: no output)."""
    hints = typing.get_type_hints(args)
    aliases = iter("abcdefghijklmnopqrstuvwxyz")
    params = []
    for name in args._fields:
        kind = _schema_type(hints[name])
        if name in mutates:
            if kind != "Tensor":
                raise TypeError(f"mutated argument {name} must be a Tensor")
            kind = f"Tensor({next(aliases)}!)"
        params.append(f"{kind} {name}")
    unknown = set(mutates) - set(args._fields)
    if unknown:
        raise ValueError(f"mutates names no parameter: {sorted(unknown)}")
    returns = "()" if out is None else "(" + ", ".join(f"Tensor {name}" for name in out._fields) + ")"
    return f"({', '.join(params)}) -> {returns}"


def define(
    name: str,
    args: type,
    out: type | None,
    impl: Callable,
    fake: Callable,
    mutates: tuple[str, ...] = (),
) -> torch._ops.OpOverload:
    """Declare ``nlft_kernels::name``: ``impl(args_tuple)`` computes it on real tensors (any
    device), ``fake(args_tuple)`` gives its outputs' shapes and dtypes (``torch.compile``)."""
    LIB.define(name + schema(args, out, mutates))

    def returned(result):
        # One output is returned as the tensor itself, several as a tuple (the schema's rule).
        if out is None:
            return None
        return result[0] if len(out._fields) == 1 else tuple(result)

    def run(*values):
        return returned(impl(args(*values)))

    def run_fake(*values):
        return returned(fake(args(*values)))

    LIB.impl(name, run, "CompositeExplicitAutograd")
    torch.library.register_fake(f"nlft_kernels::{name}", run_fake, lib=LIB)
    return getattr(torch.ops.nlft_kernels, name).default
