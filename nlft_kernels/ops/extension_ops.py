"""The compiled kernels of ``nlft_kernels._C`` with the signatures of the Triton launchers
(``ops/kernels.py``): the backends ``cpp`` (CPU tensors) and ``cuda`` (CUDA tensors: the row
pass) of ``nlft_kernels.backends``.

They run inside the package's ops (``ops/loss_ops.py``), which ``torch.compile`` sees as opaque
nodes with fake implementations, so they need no op of their own. The row rule's constants
reach the binding by keyword (``RuleConstants.kwargs()``).
"""

from __future__ import annotations

import functools

from torch import Tensor

from nlft_kernels.config import NLFTConfig
from nlft_kernels.extension import compiled
from nlft_kernels.ops.contracts import RuleConstants, acc_dtype
from nlft_kernels.ops.inputs import Views
from nlft_kernels.ops.launch import CudaDevice, cuda_row_blocks


@functools.cache
def _device(index: int) -> CudaDevice:
    """What the row pass's choice needs of CUDA device ``index``, asked once (no sync: safe
    under CUDA-graph capture)."""
    return CudaDevice.of(index)


def row_pass(v: Views, cfg: NLFTConfig, compute_grad: bool, out: Tensor | None = None):
    """The row pass of the C++ (CPU tensors) or CUDA kernel (CUDA tensors): (stats [3, N] ACC,
    saliency [N] bool, gradient shaped like the base logits in ``grad_dtype`` or None), the
    gradient written into ``out`` when given (contiguous; may be ``v.base`` itself). On CUDA the
    kernel is ``launch.cuda_row_blocks``' choice: one block per row, or the on-chip clusters."""
    base = v.base
    blocks = (
        cuda_row_blocks(base.shape[-1], v.streams, base.dtype, _device(base.device.index), compute_grad)
        if base.is_cuda
        else 0
    )
    stats, saliency, grad = compiled().first_stage(
        base, v.standard, int(v.standard_mode), v.judge, int(v.judge_mode), v.labels, v.wrong, v.scale,
        **RuleConstants.of(cfg).kwargs(), compute_grad=compute_grad, grad_out=out if compute_grad else None,
        blocks_per_row=blocks,
    )  # fmt: skip
    return stats, saliency, grad if compute_grad else None


def scale_rows(grad: Tensor, factor: Tensor) -> None:
    """grad[r] *= factor[r] for every row of CPU ``grad`` [R, V], in place: rows whose factor is
    1 untouched, rows whose factor is 0 zero-filled without a read."""
    compiled().scale_rows(grad, factor.to(acc_dtype(grad.dtype)))


def label_logprobs(x: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(log p(label) [N], lse [N]) of CPU ``x`` [B, T, V]: one vectorised sweep per labelled row."""
    return compiled().label_logprobs(x, labels, ignore_index)


def softmax_grad(x: Tensor, labels: Tensor, lse: Tensor, coef: Tensor, ignore_index: int, out: Tensor) -> Tensor:
    """``out`` (contiguous, the size of CPU ``x`` [B, T, V]; may be ``x`` itself) =
    ``coef * (softmax(x) - onehot(label))`` per row; rows whose coef is 0, or ignored, are
    zero-filled without a read."""
    compiled().softmax_grad(x, labels, lse, coef, ignore_index, out.view(-1, x.shape[-1]))
    return out


def label_logprobs_grad(x: Tensor, labels: Tensor, coef: Tensor, ignore_index: int, out: Tensor):
    """(log p(label) [N], lse [N]) of CPU ``x`` and ``out`` = ``coef * (softmax(x) - onehot)``:
    the C++ log-prob pass, then the C++ gradient pass (the row read twice)."""
    lp, lse = label_logprobs(x, labels, ignore_index)
    softmax_grad(x, labels, lse, coef, ignore_index, out)
    return lp, lse
