"""What NLFT makes of a set of judged training responses, before it trains on them.

Whether NLFT can beat SFT depends on the records: with no wrong record it is a reweighted SFT;
with wrong records, on whether the judge view moves the model's probabilities enough to mark
the wrong tokens salient (and so train them by unlikelihood). Per record, from
:func:`nlft_kernels.saliency_map.saliency_details` (the loss's own per-token details):

- tokens, saliency, unlikelihood, killed: counts of the response's tokens and marks;
- over_rule: a wrong record with more than ``saliency_fraction`` (6%) saliency tokens, whose
  ordinary tokens the rule zeroes;
- likelihood_weight, unlikelihood_weight: the summed token weights trained each way;
- wrong_tokens: the tokens of the wrong spans (:meth:`Task.wrong_spans`: "128" in
  "84 + 14 = 128"), how many of them unlikelihood trains, and the weights of the others
  (trained by likelihood: NLFT reinforces them, as SFT does).

:func:`summarize` adds records up: the share of correct records, unlikelihood tokens per wrong
record, records over the rule, the likelihood share of the wrong records' weight, and the wrong
tokens' treatment.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from nlft_kernels.config import NLFTConfig
from nlft_kernels.recipes.study import JudgedResponse, arm_records
from nlft_kernels.recipes.tasks import Problem, Task


def record_diagnostics(
    model,
    tokenizer,
    task: Task,
    problems: Sequence[Problem],
    judged: Sequence[JudgedResponse],
    *,
    config: NLFTConfig = NLFTConfig(),
    batch_size: int = 8,
    max_length: int = 512,
    details: list | None = None,
) -> list[dict]:
    """One dict per judged response (see the module docstring), in order. ``details``: the
    records' :class:`~nlft_kernels.saliency_map.RecordSaliency` when already computed."""
    from nlft_kernels.saliency_map import saliency_details

    if details is None:
        records = arm_records(task, problems, judged, "nlft")
        details = saliency_details(
            model, tokenizer, records, config=config, batch_size=batch_size, max_length=max_length
        )
    rows = []
    for j, d in zip(judged, details, strict=True):
        spans = [] if j.correct else task.wrong_spans(problems[j.problem], j.response)
        tokens = [t for t in d.tokens if not t.special]
        starts, position = [], 0
        for t in tokens:
            starts.append(position)
            position += len(t.text)
        wrong = [
            t
            for t, start in zip(tokens, starts, strict=True)
            if t.text.strip() and any(start < end and start + len(t.text) > begin for begin, end in spans)
        ]
        counts = d.counts()
        rows.append(
            {
                "correct": j.correct,
                "tokens": counts["tokens"],
                "saliency": counts["saliency"],
                "unlikelihood": counts["unlikelihood"],
                "killed": counts["killed"],
                "over_rule": (not j.correct)
                and counts["saliency"] > config.saliency_fraction * max(1, counts["tokens"]),
                "likelihood_weight": sum(t.weight for t in d.tokens if not t.unlikelihood),
                "unlikelihood_weight": sum(t.weight for t in d.tokens if t.unlikelihood),
                "wrong_tokens": len(wrong),
                "wrong_unlikelihood": sum(t.unlikelihood for t in wrong),
                "wrong_likelihood_weights": [round(t.weight, 4) for t in wrong if not t.unlikelihood],
            }
        )
    return rows


def summarize(rows: Sequence[dict]) -> dict:
    """The diagnostics of a set of records (rows of :func:`record_diagnostics`)."""
    wrong = [r for r in rows if not r["correct"]]
    unlikely = [r["unlikelihood"] for r in wrong]
    likelihood = sum(r["likelihood_weight"] for r in wrong)
    total = likelihood + sum(r["unlikelihood_weight"] for r in wrong)
    wrong_weights = [w for r in wrong for w in r["wrong_likelihood_weights"]]
    wrong_tokens = sum(r["wrong_tokens"] for r in wrong)
    return {
        "records": len(rows),
        "correct_share": (len(rows) - len(wrong)) / max(1, len(rows)),
        "wrong_records": len(wrong),
        "unlikelihood_tokens_per_wrong_record": statistics.fmean(unlikely) if unlikely else None,
        "unlikelihood_tokens_median": statistics.median(unlikely) if unlikely else None,
        "wrong_records_without_unlikelihood": sum(u == 0 for u in unlikely),
        "records_over_saliency_rule": sum(r["over_rule"] for r in wrong),
        "wrong_records_likelihood_weight_share": likelihood / total if total else None,
        "wrong_tokens": wrong_tokens,
        "wrong_tokens_unlikelihood_share": sum(r["wrong_unlikelihood"] for r in wrong) / wrong_tokens
        if wrong_tokens
        else None,
        "wrong_tokens_likelihood_weight_mean": statistics.fmean(wrong_weights) if wrong_weights else None,
        "wrong_tokens_likelihood_weight_range": [min(wrong_weights), max(wrong_weights)] if wrong_weights else None,
    }


def describe(summary: dict) -> str:
    """The diagnostics in one sentence, for logs and reports."""
    s = summary
    if not s["wrong_records"]:
        return f"{s['records']} records, all correct: NLFT is a reweighted SFT here."
    parts = [
        f"{s['records']} records, {100 * s['correct_share']:.0f}% correct; per wrong record "
        f"{s['unlikelihood_tokens_per_wrong_record']:.1f} unlikelihood tokens (median "
        f"{s['unlikelihood_tokens_median']:g}; {s['wrong_records_without_unlikelihood']} of {s['wrong_records']} "
        f"with none), {s['records_over_saliency_rule']} over the 6% rule",
    ]
    if s["wrong_records_likelihood_weight_share"] is not None:
        parts.append(
            f"{100 * s['wrong_records_likelihood_weight_share']:.0f}% of the wrong records' weight on likelihood"
        )
    if s["wrong_tokens"]:
        share = s["wrong_tokens_unlikelihood_share"]
        mean = s["wrong_tokens_likelihood_weight_mean"]
        parts.append(
            f"of the {s['wrong_tokens']} tokens of wrong numbers/labels, {100 * share:.0f}% trained by unlikelihood"
            + (f", the rest reinforced with mean weight {mean:.2f}" if mean is not None else "")
        )
    return "; ".join(parts) + "."
