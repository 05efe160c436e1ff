"""Per-token NLFT details of judged records: the three views run through the model as the
trainer runs them, and the loss's own per-token details (:class:`nlft_kernels.NLFTDetails`).

Nothing of the rule is recomputed here: the records are encoded and collated by
:mod:`nlft_kernels.training.data` (``encode_record``, ``NLFTCollator``) and run through the
trainer's own batch loss (:func:`nlft_kernels.training.batch_loss.nlft_batch_loss` with
``return_details=True``): every weight and mark comes from :func:`nlft_kernels.nlft_linear_loss`'s
details (saliency clusters walk the base view's hidden states, as in training).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from nlft_kernels.config import NLFTConfig

MARKS = ("saliency", "unlikelihood", "cluster", "killed")


@dataclass
class TokenSaliency:
    """One response token and what NLFT makes of it.

    text: the token's characters in the response (whitespace and newlines included; the
    pieces of a response add up to it), or the tokenizer's EOS text for the final EOS;
    p_base, p_standard: probability of the token under the base and standard views; p_judge:
    under the judge view (None in a correct response: its judge view is not run); weight: the
    token weight w; saliency, unlikelihood, cluster, killed: the marks of
    :class:`nlft_kernels.NLFTDetails` (killed: an ordinary token of a wrong response zeroed by
    the saliency-fraction rule); loss: the token's loss
    (``loss_scale * (token_loss + nll_weight * NLL)``); special: the EOS token.
    """

    text: str
    token_id: int
    p_base: float
    p_standard: float
    p_judge: float | None
    weight: float
    saliency: bool = False
    unlikelihood: bool = False
    cluster: bool = False
    killed: bool = False
    loss: float = 0.0
    special: bool = False

    @property
    def marks(self) -> tuple[str, ...]:
        """The names of the marks this token carries, in :data:`MARKS` order."""
        return tuple(name for name in MARKS if getattr(self, name))


@dataclass
class RecordSaliency:
    """One record (question, reference answer, response, judgment, correct) and its tokens.

    index: the record's position in the input; tokens: the response's tokens that the views
    hold (the first ``len(tokens)`` of ``response_tokens`` when ``max_length`` truncated it);
    loss: the sample's loss, ``sum(token.loss) / len(tokens)`` (what ``sample_mean`` averages).
    """

    index: int
    question: str
    answer: str
    response: str
    judgment: str | None
    correct: bool
    tokens: list[TokenSaliency] = field(default_factory=list)
    response_tokens: int = 0

    @property
    def loss(self) -> float:
        return sum(t.loss for t in self.tokens) / max(1, len(self.tokens))

    @property
    def truncated(self) -> bool:
        return len(self.tokens) < self.response_tokens

    def counts(self) -> dict[str, int]:
        """Tokens in all and per mark."""
        return {"tokens": len(self.tokens)} | {m: sum(getattr(t, m) for t in self.tokens) for m in MARKS}

    def to_dict(self) -> dict:
        """A JSON-ready dict (the record's fields, ``loss`` and the tokens as dicts)."""
        out = asdict(self)
        out["loss"] = self.loss
        return out


# ---------------------------------------------------------------------------------------------
# Tokens as text.


def token_pieces(tokenizer, text: str, ids: Sequence[int]) -> list[str]:
    """The characters of ``text`` that each of its token ``ids`` stands for.

    From a fast tokenizer's offsets when they tokenise ``text`` to ``ids``: each piece runs
    from the previous token's end to this one's, so the pieces add up to ``text`` exactly
    (whitespace included; a character split over several byte tokens goes to the first).
    Otherwise each token decoded on its own.
    """
    ids = list(ids)
    if getattr(tokenizer, "is_fast", False):
        try:
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError):
            encoded = None
        if encoded is not None and list(encoded["input_ids"]) == ids:
            pieces, previous = [], 0
            for _, end in encoded["offset_mapping"]:
                end = max(end, previous)
                pieces.append(text[previous:end])
                previous = end
            if pieces:
                pieces[-1] += text[previous:]
            return pieces
    return [tokenizer.decode([i]) for i in ids]


# ---------------------------------------------------------------------------------------------
# The three views through the model: the trainer's batch loss, with its details.


def _to_float(values: torch.Tensor) -> list[float]:
    return [float(v) for v in values.double().cpu()]


@torch.no_grad()
def batch_details(model, batch: dict[str, torch.Tensor], config: NLFTConfig = NLFTConfig(), pad_token_id: int = 0):
    """The :class:`nlft_kernels.NLFTDetails` of a collated batch (:class:`NLFTCollator`), and the
    judge log-probs' validity: ``(details, judged)`` with ``judged`` [B] bool (wrong samples).

    The trainer's own batch loss (:func:`nlft_kernels.training.batch_loss.nlft_batch_loss`
    with ``return_details``), without gradient: the same views, rows, teachers and fused loss.
    """
    from nlft_kernels.training.batch_loss import nlft_batch_loss

    _, details = nlft_batch_loss(model, batch, config, pad_token_id=pad_token_id, return_details=True)
    return details, ~batch["correct"].bool().to(details.weight.device)


def saliency_details(
    model,
    tokenizer,
    records: Iterable,
    *,
    config: NLFTConfig = NLFTConfig(),
    templates=None,
    max_length: int | None = 1024,
    batch_size: int = 4,
    progress: bool = False,
) -> list[RecordSaliency]:
    """Per-token NLFT details of ``records`` (:class:`nlft_kernels.training.NLFTRecord` s) for
    ``model`` and its ``tokenizer``: one :class:`RecordSaliency` per record, in order.

    The records are encoded as training encodes them (``templates``: the prompt views,
    default :data:`nlft_kernels.training.DEFAULT_TEMPLATES`; ``max_length``: the longest view,
    the response is cut to fit) and run ``batch_size`` at a time; a record whose prompts leave
    no room for a response token gets no tokens. Each record's details depend on that record
    only (the saliency-fraction rule and the clusters are per sample), so ``batch_size`` does
    not change them. The model runs in eval mode (no dropout), then gets its mode back.
    ``progress``: a tqdm bar over the records.
    """
    from nlft_kernels.training.data import (
        DEFAULT_TEMPLATES,
        NLFTCollator,
        encode_record,
        pad_token_id_of,
        response_ids,
    )

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    templates = DEFAULT_TEMPLATES if templates is None else templates
    records = list(records)
    results = [
        RecordSaliency(
            i,
            r.question,
            r.answer,
            r.response,
            r.judgment,
            bool(r.correct),
            response_tokens=len(response_ids(r.response, tokenizer)),
        )
        for i, r in enumerate(records)
    ]
    encoded = [(i, encode_record(r, tokenizer, templates, max_length)) for i, r in enumerate(records)]
    encoded = [(i, e) for i, e in encoded if e is not None]
    pad = pad_token_id_of(tokenizer)
    collate = NLFTCollator(pad, config.ignore_index)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(records), desc="nlft saliency", unit="record", disable=not progress)
    bar.update(len(records) - len(encoded))
    training = model.training
    model.eval()  # no dropout: the map of the model as it is
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            details, judged = batch_details(model, collate([e for _, e in chunk]), config, pad)
            for b, (i, features) in enumerate(chunk):
                labels = features["labels"]
                results[i].tokens = _tokens(tokenizer, records[i].response, labels, details, b, bool(judged[b]))
            bar.update(len(chunk))
    finally:
        model.train(training)
        bar.close()
    return results


def _tokens(tokenizer, response: str, labels: list[int], details, b: int, judged: bool) -> list[TokenSaliency]:
    """The :class:`TokenSaliency` list of sample ``b`` of ``details`` (its first len(labels) rows)."""
    n = len(labels)
    texts = token_pieces(tokenizer, response, tokenizer(response, add_special_tokens=False)["input_ids"])
    columns = {
        "p_base": _to_float(details.logprob_base[b, :n].exp()),
        "p_standard": _to_float(details.logprob_standard[b, :n].exp()),
        "p_judge": _to_float(details.logprob_judge[b, :n].exp()) if judged else [None] * n,
        "weight": _to_float(details.weight[b, :n]),
        "loss": _to_float(details.token_loss[b, :n]),
    } | {m: [bool(v) for v in getattr(details, m)[b, :n].cpu()] for m in MARKS}
    tokens = []
    for r, token_id in enumerate(labels):
        special = r >= len(texts)  # past the response's own tokens: the EOS that encode_record appends
        text = (tokenizer.eos_token or "") if special else texts[r]
        tokens.append(TokenSaliency(text, int(token_id), special=special, **{k: v[r] for k, v in columns.items()}))
    return tokens
