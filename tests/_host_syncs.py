"""Counting host syncs on the CPU: the calls that, on a CUDA device, wait for the GPU.

``torch.cuda.set_sync_debug_mode`` needs a GPU. On the CPU the torch calls that would make the
host wait for a device result are wrapped for the duration of a ``with HostSyncCounter()``:
reading a value (``item``, ``tolist``, ``bool``/``int``/``float`` of a tensor) and the ops whose
output size depends on the data (``nonzero``, ``unique_consecutive``, ``bincount``,
``masked_select``, indexing with a boolean mask). They are patched on ``torch.Tensor`` and
``torch`` rather than caught by a ``TorchFunctionMode``, which autograd's backward does not see.
Calls inside the compiled extension (``_C``) are invisible, and they do not sync.
"""

from __future__ import annotations

import collections
import traceback

import torch

_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "unique_consecutive", "unique",
            "bincount", "masked_select")  # fmt: skip
_FUNCTIONS = ("nonzero", "argwhere", "unique_consecutive", "unique", "bincount", "masked_select", "equal")


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncCounter:
    """``with HostSyncCounter() as c: ...`` then ``c.count`` and ``c.sites`` ("file:line call" of
    the innermost frame in ``nlft_kernels`` -> count)."""

    def __init__(self):
        self.count = 0
        self.sites: collections.Counter[str] = collections.Counter()
        self._saved: list[tuple[object, str, object]] = []

    def _record(self, name: str) -> None:
        self.count += 1
        frames = [f for f in traceback.extract_stack()[:-2] if "nlft_kernels" in f.filename]
        where = f"{frames[-1].filename.split('nlft_kernels/')[-1]}:{frames[-1].lineno}" if frames else "outside"
        self.sites[f"{where} {name}"] += 1

    def _wrap(self, owner, name: str, when=None) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))

        def wrapper(*args, **kwargs):
            if when is None or when(*args, **kwargs):
                self._record(name)
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    def __enter__(self) -> HostSyncCounter:
        for name in _METHODS:
            self._wrap(torch.Tensor, name)
        for name in _FUNCTIONS:
            self._wrap(torch, name)
        self._wrap(torch.Tensor, "__getitem__", lambda self, index: _bool_index(index))
        self._wrap(torch.Tensor, "__setitem__", lambda self, index, value: _bool_index(index))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()
