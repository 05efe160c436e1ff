"""Does a float16 gradient stored before GradScaler's factor lose what matters?

The question behind ``GradStore`` (nlft_kernels/ops/contracts.py): the fused losses could write
the float16 gradient of the logits in forward, before backward multiplies it by ``grad_output``
(GradScaler's factor, 2**16 by default), or in backward with the factor folded in before the one
float16 rounding, as torch's own float16 training does (float32 math, then a cast). For random
logits rows (normal, several spreads) at real vocabularies and the row scale of a batch of
``tokens`` tokens (``loss_scale / tokens``, the sample mean's order), each case records the
share of a row's softmax mass flushed to 0 and the relative error of the hidden gradient
``G @ W`` (random ``W``, D=256) against float64, for both orders.

    python -m benchmarks.fp16_gradient_underflow

writes ``benchmarks/results/fp16_gradient_underflow.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from benchmarks import _util

OUT = Path(__file__).parent / "results" / "fp16_gradient_underflow.json"
SCALER = 2.0**16
DIM, ROWS, LOSS_SCALE = 256, 64, 10.0


def case(vocab: int, spread: float, tokens: int, g: torch.Generator) -> dict:
    logits = torch.randn(ROWS, vocab, generator=g, dtype=torch.float64) * spread
    labels = torch.randint(0, vocab, (ROWS,), generator=g)
    weight = torch.randn(vocab, DIM, generator=g, dtype=torch.float64) / DIM**0.5
    grad = torch.softmax(logits, -1)
    grad[torch.arange(ROWS), labels] -= 1
    grad *= LOSS_SCALE / tokens
    before = grad.half().double()  # stored in forward, the factor applied afterwards
    after = (grad * SCALER).half().double() / SCALER  # the factor folded in before the rounding
    exact = grad @ weight

    def error(stored):
        return float((stored @ weight - exact).norm() / exact.norm())

    non_label = grad.abs().sum(-1) / 2  # the softmax mass off the label, per row
    flushed = ((grad.half() == 0) * grad).abs().sum(-1) / non_label
    return {
        "vocab": vocab,
        "logit_std": spread,
        "tokens": tokens,
        "softmax_mass_flushed_before_scaler": float(flushed.mean()),
        "hidden_grad_rel_error_stored_before_scaler": error(before),
        "hidden_grad_rel_error_scaler_folded_in": error(after),
    }


def main(argv: list[str]) -> int:
    g = torch.Generator().manual_seed(0)
    rows = [case(v, s, n, g) for v in (32000, 128256) for s in (1.0, 2.0, 4.0) for n in (512, 8192)]
    payload = _util.environment(torch.device("cpu")) | {
        "command": _util.command_line("benchmarks.fp16_gradient_underflow", argv),
        "date": _util.today(),
        "grad_scaler": SCALER,
        "rows": rows,
    }
    _util.write_json(OUT, payload)
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
