"""Per-token NLFT details of judged records: the three views run through the model as the
trainer runs them, and the loss's own per-token details (:class:`nlft_kernels.NLFTDetails`).

Nothing of the rule is recomputed here: the records are encoded and collated by
:mod:`nlft_kernels.training.data` (``encode_record``, ``NLFTCollator``), each view's final
hidden states are gathered on the rows that predict the response tokens (as
:func:`nlft_kernels.training.trainer.nlft_batch_loss` does), the teachers' label log-probs come
from :func:`nlft_kernels.linear_token_logprobs` and every weight and mark from
:func:`nlft_kernels.nlft_linear_loss` with ``return_details=True`` (saliency clusters walk the
base view's hidden states, as in training).
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
# The three views through the model.


def _to_float(values: torch.Tensor) -> list[float]:
    return [float(v) for v in values.double().cpu()]


def _view_rows(model, batch, view: str, index: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[b, R, D] final hidden states of ``view`` on the rows that predict the response tokens."""
    from nlft_kernels.training.trainer import final_hidden

    ids, mask, rows = (batch[f"{view}_{k}"] for k in ("input_ids", "attention_mask", "rows"))
    if index is not None:
        ids, mask, rows = ids[index], mask[index], rows[index]
    length = int(mask.sum(1).max())  # drop the all-padding columns of the sub-batch
    hidden = final_hidden(model, ids[:, :length], mask[:, :length])
    return hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])).to(dtype)


@torch.no_grad()
def batch_details(model, batch: dict[str, torch.Tensor], config: NLFTConfig = NLFTConfig()):
    """The :class:`nlft_kernels.NLFTDetails` of a collated batch (:class:`NLFTCollator`), and the
    judge log-probs' validity: ``(details, judged)`` with ``judged`` [B] bool (wrong samples).

    The views run as in training: base and standard for every sample, judge for the wrong
    ones; the loss is :func:`nlft_kernels.nlft_linear_loss` on the base view's hidden states.
    """
    from nlft_kernels import linear_token_logprobs, nlft_linear_loss
    from nlft_kernels.training.trainer import lm_head_of

    weight, bias = lm_head_of(model)
    batch = {k: v.to(weight.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    labels, correct = batch["labels"], batch["correct"].bool()
    ignore = config.ignore_index
    base = _view_rows(model, batch, "base", None, weight.dtype)
    standard_rows = _view_rows(model, batch, "standard", None, weight.dtype)
    standard = linear_token_logprobs(standard_rows, weight, labels, bias, ignore_index=ignore)
    wrong = (~correct).nonzero().squeeze(1)
    judge = None
    if wrong.numel() > 0:
        judge = torch.zeros_like(standard)
        judge_rows = _view_rows(model, batch, "judge", wrong, weight.dtype)
        judge[wrong] = linear_token_logprobs(judge_rows, weight, labels[wrong], bias, ignore_index=ignore)
    _, details = nlft_linear_loss(
        base, weight, labels, correct, standard=standard, judge=judge, bias=bias, config=config, return_details=True
    )
    return details, ~correct


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
    from nlft_kernels.training.data import DEFAULT_TEMPLATES, NLFTCollator, encode_record, response_ids

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
    pad = next((v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if v is not None), 0)
    collate = NLFTCollator(int(pad), config.ignore_index)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(records), desc="nlft saliency", unit="record", disable=not progress)
    bar.update(len(records) - len(encoded))
    training = model.training
    model.eval()  # no dropout: the map of the model as it is
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            details, judged = batch_details(model, collate([e for _, e in chunk]), config)
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
