"""Random NLFT inputs built so that every branch of the rule really occurs.

The layout of samples (their kinds, the share of lifted rows of correct ones, the padding) is the
benchmarks' (benchmarks/_util.py, ``nlft_rows``): the tests and the benchmarks exercise the same
rule. The values differ on purpose: these are [B, T, V] CPU tensors with fixed margins that the
float64 comparisons rely on; the benchmarks' are built in place on the device at real sizes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from benchmarks._util import CORRECT_LIFTED, KINDS, padding_rows

__all__ = ["KINDS", "NLFTInputs", "generator", "make_inputs", "seed_of"]


def seed_of(*parts) -> int:
    """A seed fixed by the test's parameters (not ``hash()``, which Python salts per process),
    printed so that pytest shows it with a failure."""
    seed = zlib.crc32(repr(parts).encode()) % 100_000
    print(f"seed {seed} for {parts}")
    return seed


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``, printed so that pytest shows it with a failure."""
    print(f"generator seed {seed}")
    return torch.Generator().manual_seed(seed)


@dataclass
class NLFTInputs:
    base: torch.Tensor  # [B, T, V] leaf, requires grad
    labels: torch.Tensor  # [B, T]
    correct: torch.Tensor  # [B]
    standard: torch.Tensor  # [B, T, V]
    judge: torch.Tensor  # [B, T, V]
    hidden: torch.Tensor  # [B, T, D]


def make_inputs(
    batch: int, steps: int, vocab: int, dtype=torch.float32, seed: int = 0, pad: bool = True, hidden_dim: int = 8
) -> NLFTInputs:
    """Fresh inputs; the response of sample b has ``steps - pad_b`` rows, the rest is padding."""
    print(f"make_inputs({batch}, {steps}, {vocab}, {dtype}, seed={seed}, pad={pad}, hidden_dim={hidden_dim})")
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, steps, vocab, generator=g) * 2
    standard = base + torch.randn(batch, steps, vocab, generator=g)
    judge = base + torch.randn(batch, steps, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, steps), generator=g)
    correct = torch.zeros(batch, dtype=torch.bool)
    lse = torch.logsumexp(standard, dim=-1)
    for b in range(batch):
        kind = KINDS[b % len(KINDS)]
        n = steps - (padding_rows(b, steps) if pad else 0)
        labels[b, n:] = -100
        rows = torch.arange(n)
        if kind == "correct":
            correct[b] = True
            # Lift the standard view's label so that p_s lands above 0.95 on about a third of rows.
            lifted = rows[torch.rand(n, generator=g) < CORRECT_LIFTED]
            margin = 3.0 + 4 * torch.rand(len(lifted), generator=g)
            boost = lse[b, lifted] - standard[b, lifted, labels[b, lifted]] + margin
            standard[b, lifted, labels[b, lifted]] += boost
            # and the judge never matters for correct samples: scramble it
            judge[b] = torch.randn(steps, vocab, generator=g) * 5
        else:
            count = {"wrong_many": max(2, n // 4), "wrong_one": 1, "wrong_none": 0}[kind]
            if kind != "wrong_many":
                judge[b] = base[b]  # r1 = 1: no saliency token but the lifted ones
            lifted = rows[torch.randperm(n, generator=g)[:count]]
            judge[b, lifted, labels[b, lifted]] += 12.0
    hidden = torch.randn(batch, steps, hidden_dim, generator=g).cumsum(1)
    noise = torch.randn(batch, steps, hidden_dim, generator=g)
    hidden = hidden * (torch.rand(batch, steps, 1, generator=g) < 0.5) + 2 * noise
    return NLFTInputs(
        base=base.to(dtype).requires_grad_(),
        labels=labels,
        correct=correct,
        standard=standard.to(dtype),
        judge=judge.to(dtype),
        hidden=hidden,
    )
