"""The one input-preparation step of the NLFT entry points (``nlft_loss``, ``nlft_linear_loss``
and their vocabulary-parallel forms), in two parts:

- ``prepare_nlft_inputs``, in the public function: the checks that read no tensor value
  (types, shapes, dtypes, devices) and the teacher views' modes, so that a bad call fails
  before anything runs, and nothing syncs with the device (nothing here breaks a
  ``torch.compile`` graph);
- ``make_views``, inside the ops (``ops/loss_ops.py``), at run time: the rows of wrong
  samples, each row's scale in the reduced loss, gathered in ``Views``, and with ``validate``
  the checks that read values (label range, sample ids, teacher log-probs, a judge for wrong
  samples: host syncs), eagerly and compiled alike.

And the per-token outputs (``NLFTDetails``) shaped back like the labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nlft_kernels.config import NLFTConfig
from nlft_kernels.ops.contracts import ViewMode
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


def check_labels(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Labels shaped like ``logits`` without V, integer, on its device; returns them as int64.
    Their range is checked at run time (``check_label_range``)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {logits.device}")
    return labels.long()


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label in [0, vocab) or ``ignore_index`` (one host sync; ``validate`` only)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = labels[bad][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; found {value}")


def check_samples(base_logits, labels, correct, sample_ids) -> tuple[torch.Tensor, torch.Tensor]:
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
    return sample_ids.long(), correct


def check_sample_ids(sample_ids: torch.Tensor, samples: int) -> None:
    """Sample ids in [0, samples) and non-decreasing (host syncs; ``validate`` only)."""
    if bool(((sample_ids < 0) | (sample_ids >= samples)).any()):
        raise ValueError(f"sample_ids must be in [0, {samples}), one entry of correct per sample")
    if bool((sample_ids[1:] < sample_ids[:-1]).any()):
        raise ValueError("sample_ids must be non-decreasing: the rows of one sample are contiguous")


def teacher_view(view, name: str, base_logits: torch.Tensor):
    """A teacher view as ([B, T, V] logits, LOGITS) or ([N] label log-probs, LOGPROBS), detached."""
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
        # In the caller's dtype: the ops check it (``check_teacher_logprobs``) and convert it.
        return view.reshape(-1), ViewMode.LOGPROBS
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
    """One call's inputs after ``prepare_nlft_inputs``: labels [N] int64, the [N] sample of each
    row, the [S] correctness of each sample, the teacher views (``teacher_view``) and the labels'
    shape (that of every per-token output)."""

    labels: torch.Tensor
    sample_ids: torch.Tensor
    correct: torch.Tensor
    standard: torch.Tensor
    standard_mode: ViewMode
    judge: torch.Tensor | None
    judge_mode: ViewMode
    shape: torch.Size


def prepare_nlft_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    correct: torch.Tensor,
    standard: torch.Tensor,
    judge: torch.Tensor | None,
    sample_ids: torch.Tensor | None,
    *,
    name: str = "base_logits",
) -> NLFTInputs:
    """Check the arguments of an NLFT loss of ``logits`` [B, T, V] or [N, V] (a zero-byte proxy
    of that shape where the logits never exist; ``name`` in the errors) without reading a value.
    ``config`` and ``reduction`` are checked by the caller (``check_options``), first."""
    check_logits(logits, name)
    labels = check_labels(labels, logits)
    sample_ids, correct = check_samples(logits, labels, correct, sample_ids)
    standard_t, standard_mode = teacher_view(standard, "standard", logits)
    judge_t, judge_mode = (None, ViewMode.NONE) if judge is None else teacher_view(judge, "judge", logits)
    flat_labels = labels.reshape(-1).contiguous()
    return NLFTInputs(flat_labels, sample_ids, correct, standard_t, standard_mode, judge_t, judge_mode, labels.shape)


def check_teacher_logprobs(view: torch.Tensor, name: str) -> None:
    """Teacher log-probs above 0 (a probability above 1: logits passed as [B, T], or a sign
    flipped) are refused, beyond the rounding of their dtype (one host sync; ``validate`` only)."""
    if bool((view > 8 * torch.finfo(view.dtype).eps).any()):
        worst = float(view.max())
        raise ValueError(
            f"{name} given as [B, T] label log-probs must be <= 0 (log of a probability), found {worst:.4g}: "
            f"pass log-probs (e.g. log_softmax(logits).gather(...)), or the [B, T, V] logits"
        )


def make_views(
    base: torch.Tensor | None,
    standard: torch.Tensor | None,
    standard_mode: int,
    judge: torch.Tensor | None,
    judge_mode: int,
    labels: torch.Tensor,
    sample_ids: torch.Tensor,
    correct: torch.Tensor,
    config: NLFTConfig,
    reduction: str,
    acc: torch.dtype,
    validate: bool,
    vocab: int,
) -> Views:
    """The ``Views`` of one call, inside an op at run time: teacher log-probs in ACC, the rows of
    wrong samples and each row's scale in the reduced loss. ``vocab``: the vocabulary the labels
    index (the logits' V, or the whole vocabulary of a vocabulary-parallel call).

    ``validate`` checks what the values must satisfy (host syncs): label range, sample ids,
    teacher log-probs, a judge view when any sample is wrong. Without it nothing syncs, and the
    rows of a wrong sample without a judge get a NaN scale: a NaN loss, never a wrong sample
    silently trained as a correct one.
    """
    valid = labels != config.ignore_index
    if validate:
        check_label_range(labels, vocab, config.ignore_index)
        check_sample_ids(sample_ids, correct.numel())
    wrong_rows = ~correct[sample_ids]
    if validate:
        if judge_mode == ViewMode.NONE and bool(wrong_rows.any()):
            raise ValueError("judge is required when any sample is wrong (correct has False entries)")
    views = []
    for view, mode, name in ((standard, standard_mode, "standard"), (judge, judge_mode, "judge")):
        if mode == ViewMode.LOGPROBS:
            if validate:
                check_teacher_logprobs(view, name)
            view = view.to(acc).contiguous()
        views.append(view)
    scale = row_scale(valid, sample_ids, correct.numel(), reduction, config.loss_scale, acc)
    if judge_mode == ViewMode.NONE:
        wrong = torch.zeros_like(valid)
        scale = torch.where(wrong_rows & valid, float("nan"), scale)
    else:
        wrong = wrong_rows & valid
    return Views(base, views[0], ViewMode(standard_mode), views[1], ViewMode(judge_mode), labels, wrong, scale)


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
