"""The one input-preparation step of the NLFT entry points (``nlft_loss``, ``nlft_linear_loss``
and their vocabulary-parallel forms): argument checks, the teacher views' modes, the rows of
wrong samples and each row's scale in the reduced loss, gathered in ``Views``; and the
per-token outputs (``NLFTDetails``) shaped back like the labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.contracts import ViewMode, acc_dtype
from nlft_kernels.ops.row_rule import row_scale

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("sample_mean", "token_mean", "sum", "none")

# Rows of a [B, T, V] tensor are addressed as b * stride_b + t * stride_t, so a sliced view
# such as ``logits[:, :-1]`` is read in place instead of being copied to [B*T, V].


def as_3d(x: torch.Tensor, name: str) -> torch.Tensor:
    """[N, V] -> [1, N, V]; [B, T, V] as is; unit stride along V (copies only when it is not)."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, T, V] or [N, V], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def flat_rows(view: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Flat rows [start, stop) of a [B, T, V] view as [r, V], copying at most those rows."""
    steps = view.shape[1]
    pieces = []
    while start < stop:
        b, t = divmod(start, steps)
        take = min(stop - start, steps - t)
        pieces.append(view[b, t : t + take])
        start += take
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def check_options(config: NLFTConfig, reduction: str) -> None:
    if not isinstance(config, NLFTConfig):
        raise ValueError(f"config must be an NLFTConfig, got {type(config).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_logits(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() not in (2, 3) or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty [B, T, V] or [N, V] tensor, got shape {tuple(x.shape)}")


def check_labels(
    labels: torch.Tensor, logits: torch.Tensor, ignore_index: int, validate: bool, vocab: int | None = None
) -> torch.Tensor:
    """Labels shaped like ``logits`` without V, integer, on its device; returns them as int64.
    ``validate`` checks them against ``vocab`` (default: the logits' last dimension)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {logits.device}")
    labels = labels.long()
    if validate:
        vocab = logits.shape[-1] if vocab is None else vocab
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            value = labels[bad][0].item()
            raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; found {value}")
    return labels


def check_samples(base_logits, labels, correct, sample_ids, validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """([N] int64 sample of each row, [S] bool correctness) from the caller's form: [B, T] rows
    (one sample per batch row) or flat [N] rows with ``sample_ids``."""
    if not isinstance(correct, torch.Tensor):
        raise ValueError(f"correct must be a torch.Tensor of bools, got {type(correct).__name__}")
    if correct.dim() != 1 or correct.dtype.is_floating_point:
        raise ValueError(f"correct must be a 1-D bool tensor, got shape {tuple(correct.shape)} {correct.dtype}")
    if correct.device != base_logits.device:
        raise ValueError(f"correct is on {correct.device} but base_logits is on {base_logits.device}")
    correct = correct.bool()
    if base_logits.dim() != 2:
        if sample_ids is not None:
            raise ValueError("sample_ids is only for flat rows: base_logits [N, V], labels [N]")
        batch, steps = labels.shape
        if correct.numel() != batch:
            raise ValueError(f"correct must have shape ({batch},), one entry per sample, got {tuple(correct.shape)}")
        return torch.arange(batch, device=labels.device).repeat_interleave(steps), correct
    if sample_ids is None:
        raise ValueError("sample_ids [N] is required with flat rows (base_logits [N, V])")
    if not isinstance(sample_ids, torch.Tensor) or sample_ids.shape != labels.shape:
        got = tuple(getattr(sample_ids, "shape", ()))
        raise ValueError(f"sample_ids must have shape {tuple(labels.shape)}, got {got}")
    if sample_ids.dtype.is_floating_point or sample_ids.dtype == torch.bool:
        raise ValueError(f"sample_ids must be an integer tensor, got {sample_ids.dtype}")
    if sample_ids.device != base_logits.device:
        raise ValueError(f"sample_ids is on {sample_ids.device} but base_logits is on {base_logits.device}")
    sample_ids = sample_ids.long()
    if validate:
        if bool(((sample_ids < 0) | (sample_ids >= correct.numel())).any()):
            raise ValueError(f"sample_ids must be in [0, {correct.numel()}), one entry of correct per sample")
        if bool((sample_ids[1:] < sample_ids[:-1]).any()):
            raise ValueError("sample_ids must be non-decreasing: the rows of one sample are contiguous")
    return sample_ids, correct


def teacher_view(view, name: str, base_logits: torch.Tensor, acc: torch.dtype, validate: bool = False):
    """A teacher view as ([B, T, V] logits, LOGITS) or ([N] log-probs in ACC, LOGPROBS).

    ``validate``: log-probs above 0 (a probability above 1: logits passed as [B, T], or a sign
    flipped) are refused, beyond the rounding of their dtype (one host sync)."""
    if not isinstance(view, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (logits or label log-probs), got {type(view).__name__}")
    if view.device != base_logits.device:
        raise ValueError(f"{name} is on {view.device} but base_logits is on {base_logits.device}")
    if not view.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float tensor, got {view.dtype}")
    view = view.detach()
    if view.shape == base_logits.shape:
        return as_3d(view, name), ViewMode.LOGITS
    if view.shape == base_logits.shape[:-1]:
        if validate and bool((view > 8 * torch.finfo(view.dtype).eps).any()):
            worst = float(view.max())
            raise ValueError(
                f"{name} given as [B, T] label log-probs must be <= 0 (log of a probability), found {worst:.4g}: "
                f"pass log-probs (e.g. log_softmax(logits).gather(...)), or the [B, T, V] logits"
            )
        return view.reshape(-1).to(acc).contiguous(), ViewMode.LOGPROBS
    raise ValueError(
        f"{name} must be logits of shape {tuple(base_logits.shape)} or label log-probs of shape "
        f"{tuple(base_logits.shape[:-1])}, got {tuple(view.shape)}"
    )


@dataclass
class Views:
    """The normalised rows of one call.

    base: [B, T, V] logits (any row strides); standard/judge: [B, T, V] logits
    (``ViewMode.LOGITS``) or [N] log-probs in ACC (``ViewMode.LOGPROBS``), judge None with
    ``ViewMode.NONE``; labels [N] int64; wrong [N] bool (rows of wrong samples); scale [N] ACC,
    the row's factor in the reduced loss (see ``row_scale``).
    """

    base: torch.Tensor | None
    standard: torch.Tensor | None
    standard_mode: ViewMode
    judge: torch.Tensor | None
    judge_mode: ViewMode
    labels: torch.Tensor
    wrong: torch.Tensor
    scale: torch.Tensor

    @property
    def streams(self) -> int:
        """[V] rows the row pass reads at once: the base, and each teacher given as logits."""
        return 1 + (self.standard_mode == ViewMode.LOGITS) + (self.judge_mode == ViewMode.LOGITS)

    def rows(self, start: int, stop: int, base: torch.Tensor) -> Views:
        """Rows [start, stop) of every view, with ``base`` [stop - start, V] as their base logits."""
        return self._cut(lambda view: flat_rows(view, start, stop), slice(start, stop), base)

    def select(self, index: torch.Tensor, base: torch.Tensor) -> Views:
        """The rows ``index`` [k] of every view, with ``base`` [k, V] as their base logits."""

        def logits_rows(view):
            steps = view.shape[1]
            return view[index // steps, index % steps]

        return self._cut(logits_rows, index, base)

    def _cut(self, logits_rows, index, base: torch.Tensor) -> Views:
        def cut(view, mode):
            if mode == ViewMode.LOGITS:
                return logits_rows(view).unsqueeze(0)
            return view[index] if mode == ViewMode.LOGPROBS else None

        return Views(
            base=base.unsqueeze(0),
            standard=cut(self.standard, self.standard_mode),
            standard_mode=self.standard_mode,
            judge=cut(self.judge, self.judge_mode),
            judge_mode=self.judge_mode,
            labels=self.labels[index],
            wrong=self.wrong[index],
            scale=self.scale[index],
        )


@dataclass
class NLFTInputs:
    """One call's inputs after ``prepare_nlft_inputs``: the views, the [N] sample of each row,
    the [S] correctness of each sample and the labels' shape (that of every per-token output)."""

    views: Views
    sample_ids: torch.Tensor
    correct: torch.Tensor
    shape: torch.Size


def prepare_nlft_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    correct: torch.Tensor,
    standard: torch.Tensor,
    judge: torch.Tensor | None,
    config: NLFTConfig,
    reduction: str,
    sample_ids: torch.Tensor | None,
    validate: bool,
    *,
    name: str = "base_logits",
    base: torch.Tensor | None = None,
    vocab: int | None = None,
) -> NLFTInputs:
    """Check and normalise the arguments of an NLFT loss of ``logits`` [B, T, V] or [N, V]
    (a zero-byte proxy of that shape where the logits never exist; ``name`` in the errors).

    ``base``: the base logits the row pass reads (None where every chunk brings its own, or
    set by the caller); ``vocab``: the vocabulary the labels index, when it is not ``logits``' (a shard's).
    ``config`` and ``reduction`` are checked by the caller (``check_options``), first.
    """
    check_logits(logits, name)
    labels = check_labels(labels, logits, config.ignore_index, validate, vocab)
    sample_ids, correct = check_samples(logits, labels, correct, sample_ids, validate)
    acc = acc_dtype(logits.dtype)
    wrong_rows = ~correct[sample_ids]
    standard_t, standard_mode = teacher_view(standard, "standard", logits, acc, validate)
    if judge is None:
        # Checked even with validate=False (one host sync, only without a judge): the kernels
        # would otherwise train the wrong samples as correct ones, silently. The custom op
        # checks it at run time while compiling.
        if not torch.compiler.is_compiling() and bool(wrong_rows.any()):
            raise ValueError("judge is required when any sample is wrong (correct has False entries)")
        judge_t, judge_mode = None, ViewMode.NONE
    else:
        judge_t, judge_mode = teacher_view(judge, "judge", logits, acc, validate)
    flat_labels = labels.reshape(-1).contiguous()
    valid = flat_labels != config.ignore_index
    wrong = wrong_rows & valid if judge is not None else torch.zeros_like(valid)
    scale = row_scale(valid, sample_ids, correct.numel(), reduction, config.loss_scale, acc)
    views = Views(base, standard_t, standard_mode, judge_t, judge_mode, flat_labels, wrong, scale)
    return NLFTInputs(views, sample_ids, correct, labels.shape)


@dataclass
class NLFTDetails:
    """Per-token details of one NLFT loss evaluation, each shaped like ``labels``.

    logprob_*: log p(label) of each view (float32; judge 0 on rows of correct samples);
    weight: the token weight w; saliency: saliency tokens; unlikelihood: the saliency tokens of
    wrong samples (trained by unlikelihood); cluster: cluster neighbours; killed: ordinary
    tokens of wrong samples zeroed by the saliency-fraction rule; token_loss: per-token loss
    (``loss_scale * (token_loss + nll_weight * NLL)``, 0 at padding).
    """

    logprob_base: torch.Tensor
    logprob_standard: torch.Tensor
    logprob_judge: torch.Tensor
    weight: torch.Tensor
    saliency: torch.Tensor
    unlikelihood: torch.Tensor
    cluster: torch.Tensor
    killed: torch.Tensor
    token_loss: torch.Tensor


DETAIL_FIELDS = tuple(NLFTDetails.__dataclass_fields__)
# Details that are bool (the others are in the accumulator dtype).
BOOL_DETAILS = ("saliency", "unlikelihood", "cluster", "killed")


def nlft_outputs(loss: torch.Tensor, details, shape: torch.Size, reduction: str, return_details: bool):
    """The public result: the loss (per token shaped like the labels for ``"none"``) and, with
    ``return_details``, the [N] details (``DETAIL_FIELDS`` order) as an ``NLFTDetails``."""
    if reduction == "none":
        loss = loss.view(shape)
    if not return_details:
        return loss
    return loss, NLFTDetails(*(d.view(shape) for d in details))
