"""Triton's interpreter reduces a custom combine function (``tl.reduce(..., combine_fn)``) as a
left-to-right fold over the axis; a GPU combines in a tree (shuffles within a warp, then across
warps). The row kernels' cross-lane (max, sum) merge (``ops/tl_utils.py`` ``row_stats*``) is
such a reduction: folded, thousands of small sums are added one by one onto the label lane's
sum of about 1 in float32, each rounded, and a sharply peaked row's log-prob comes out about
1e-5 too high relative (seen at V=32000 float16: 4e-4 on the loss). The GPU's tree never adds
more than log2(BLOCK_V) times onto one partial sum. ``install`` replaces the interpreter's fold
by a pairwise tree, so that the tests run the reduction order the hardware runs (and in
log2(n) combine calls instead of n).

Only the fallback for custom combine functions changes; ``tl.sum``/``tl.max``/argmin/argmax keep
the interpreter's NumPy paths.
"""

from __future__ import annotations

import numpy as np


def _tree_reduce(self, input):
    """``ReduceOps.generic_reduce`` as a tree: adjacent pairs along the axis combined at once
    (one vectorised call of the combine function per level), an odd last entry carried up."""
    import triton.language as tl

    original_axis = self.axis
    input, axis = self.unravel(input, self.axis)
    data = [np.moveaxis(arg.handle.data, axis, 0) for arg in input]
    dtypes = [arg.dtype for arg in input]
    while data[0].shape[0] > 1:
        pairs = data[0].shape[0] // 2
        left = tuple(self.to_tensor(d[0 : 2 * pairs : 2], t) for d, t in zip(data, dtypes, strict=True))
        right = tuple(self.to_tensor(d[1 : 2 * pairs : 2], t) for d, t in zip(data, dtypes, strict=True))
        combined = self.combine_fn.fn(*left, *right)
        combined = combined if isinstance(combined, tuple) else (combined,)
        merged = [
            np.broadcast_to(c.handle.data if isinstance(c, tl.core.tensor) else c, d[0 : 2 * pairs : 2].shape)
            for c, d in zip(combined, data, strict=True)
        ]
        data = [
            np.concatenate([m.astype(d.dtype), d[2 * pairs :]]) if d.shape[0] % 2 else m.astype(d.dtype)
            for m, d in zip(merged, data, strict=True)
        ]
    ret = []
    for d, t in zip(data, dtypes, strict=True):
        out = d[0]
        if self.keep_dims:
            out = np.expand_dims(out, axis) if original_axis is not None else out.reshape((1,) * len(input[0].shape))
        elif original_axis is None:
            out = out.item()
        ret.append(self.to_tensor(out, t))
    return ret


def install() -> str | None:
    """Replace the interpreter's fold; the reason where this Triton has no such method (its
    interpreter then folds, and the tests compare against a coarser sum)."""
    from triton.runtime import interpreter

    reduce_ops = getattr(interpreter, "ReduceOps", None)
    if reduce_ops is None or not hasattr(reduce_ops, "generic_reduce") or not hasattr(reduce_ops, "unravel"):
        return "this Triton's interpreter has no ReduceOps.generic_reduce to replace"
    reduce_ops.generic_reduce = _tree_reduce
    return None
