"""The demo as a library function: accuracy before, NLFT on judged responses (a stronger
sibling's, or the model's own), accuracy after, and the saliency map of the records it trained on.

    from nlft_kernels.recipes.demo import run_demo
    result = run_demo(out="nlft-demo")          # the arithmetic task (add2) on the embedded model
    print(result.summary())                     # before ...% (95% CI ...) -> after ...% (95% CI ...)

``nlft demo`` calls :func:`run_demo` with its flags (one per field of :class:`DemoSettings`, and
of :class:`~nlft_kernels.config.NLFTConfig`). The defaults were chosen by measurement so that
before -> after moves visibly on 2 CPU cores in minutes; ``summary.json`` records each run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nlft_kernels.config import NLFTConfig
from nlft_kernels.recipes.machine import device_name
from nlft_kernels.recipes.study import SOURCES, Evaluation, arm_records, evaluate, own_responses, sibling_responses
from nlft_kernels.recipes.tasks import DEFAULT_TASK, get_task, task_names


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains and evaluates (each field is a flag of ``nlft demo``; checked here).

    task: a name of :func:`nlft_kernels.recipes.tasks.get_task`; train_size questions, answered
    by the sibling solver (right with probability ``sibling_accuracy``) or sampled from the
    model itself (``source`` own, at ``temperature``: the only source for GSM8K) and judged by
    the task's judge; ``steps`` NLFT steps of ``batch_size`` records at ``lr`` (LoRA
    r=``lora_r``); test_size greedy test questions before and after; seed: the questions,
    responses, LoRA initialisation and record order.
    """

    task: str = field(default=DEFAULT_TASK, metadata=_help("the task (docs/study.md)", choices=task_names()))
    source: str | None = field(
        default=None,
        metadata=_help(
            "where the training responses come from: sibling (a solver by code, right with probability "
            "--sibling-accuracy, else a realistic slip) or own (the model's samples); default: sibling where the "
            "task has one (gsm8k has not)",
            choices=SOURCES,
        ),
    )
    train_size: int = field(default=48, metadata=_help("training questions (one response each)"))
    test_size: int = field(default=100, metadata=_help("test questions, evaluated greedily before and after"))
    sibling_accuracy: float = field(default=0.8, metadata=_help("the share of the sibling's responses that are right"))
    temperature: float = field(default=0.7, metadata=_help("sampling temperature of --source own"))
    steps: int = field(default=24, metadata=_help("NLFT optimizer steps"))
    batch_size: int = field(default=4, metadata=_help("records per step"))
    lr: float = field(default=1e-3, metadata=_help("learning rate (AdamW, LoRA)"))
    lora_r: int = field(default=16, metadata=_help("LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha"))
    seed: int = field(default=0, metadata=_help("seed of the questions, responses, LoRA initialisation and order"))
    generation_batch: int = field(default=50, metadata=_help("prompts per generation batch"))
    max_length: int = field(default=512, metadata=_help("tokens per training record, at most"))
    max_new_tokens: int | None = field(default=None, metadata=_help("tokens per response (default: the task's)"))

    def __post_init__(self) -> None:
        if self.task not in task_names():
            raise ValueError(f"task must be one of {', '.join(task_names())}, got {self.task!r}")
        if self.source is not None and self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.source == "sibling" and not get_task(self.task).has_solver:
            raise ValueError(f"task {self.task} has no sibling solver: use --source own")
        wholes = ("train_size", "test_size", "steps", "batch_size", "lora_r", "lora_alpha", "generation_batch")
        for name in (*wholes, "max_length", "max_new_tokens"):
            value = getattr(self, name)
            if name == "max_new_tokens" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {self.seed!r}")
        if not 0 <= self.sibling_accuracy <= 1:
            raise ValueError(f"sibling_accuracy must be between 0 and 1, got {self.sibling_accuracy!r}")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")

    @property
    def response_source(self) -> str:
        """``source``, or its default for the task."""
        return self.source or ("sibling" if get_task(self.task).has_solver else "own")


@dataclass
class DemoResult:
    """Accuracy before and after (each with its 95% Wilson interval), what was trained on, the
    diagnostics of its records, the files written and the wall time."""

    settings: DemoSettings
    before: Evaluation
    after: Evaluation
    records: int
    wrong_records: int
    diagnostics: dict
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = ""

    def summary(self) -> str:
        """One line: before -> after with intervals, the training, the time."""
        b, a = self.before, self.after
        return (
            f"{self.settings.task} accuracy on {a.count} test questions: before {100 * b.accuracy:.1f}% "
            f"(95% CI {100 * b.ci95[0]:.1f}-{100 * b.ci95[1]:.1f}) -> after {100 * a.accuracy:.1f}% "
            f"(95% CI {100 * a.ci95[0]:.1f}-{100 * a.ci95[1]:.1f}); {self.settings.steps} NLFT steps on "
            f"{self.records} {self.settings.response_source} responses ({self.wrong_records} wrong), "
            f"{self.seconds:.0f} s"
        )

    def to_dict(self) -> dict:
        """The JSON of ``summary.json``: the result, its settings, and the machine and command that
        made it (a figure quoted from it names its run)."""
        import torch

        return {
            "summary": self.summary(),
            "command": _command(),
            "device": self.device,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"),
            "settings": asdict(self.settings) | {"source": self.settings.response_source},
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "records": self.records,
            "wrong_records": self.wrong_records,
            "diagnostics": self.diagnostics,
            "files": {k: str(v) for k, v in self.files.items()},
            "seconds": self.seconds,
        }


def run_demo(
    settings: DemoSettings = DemoSettings(),
    *,
    model=None,
    tokenizer=None,
    out: str | Path | None = "nlft-demo",
    config: NLFTConfig = NLFTConfig(),
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> DemoResult:
    """Evaluate, train with NLFT (:func:`nlft_kernels.training.train`, ``config``'s constants) on
    the judged responses, evaluate again; write ``out/saliency.{html,png,jsonl}`` (the records'
    saliency map at the start of training), ``out/records.jsonl`` and ``out/summary.json``
    (``out`` None: nothing written). ``model``/``tokenizer``: default the embedded
    SmolLM2-135M-Instruct. The model is trained in place (its LoRA adapter merged at the end)."""
    from nlft_kernels.recipes.diagnostics import describe, record_diagnostics, summarize
    from nlft_kernels.training import NLFTTrainingArguments, save_records, train

    started = time.perf_counter()
    s = settings
    task = get_task(s.task)
    if model is None:
        from nlft_kernels.recipes.models import load_model

        model, tokenizer = load_model()
    test = task.problems("test", s.test_size, s.seed)
    problems = task.problems("train", s.train_size, s.seed)
    say(f"== {task.name} ({task.description}): {s.test_size} test questions before training")
    generation = {"batch_size": s.generation_batch, "max_new_tokens": s.max_new_tokens, "progress": progress}
    before = evaluate(model, tokenizer, task, test, **generation)
    say(f"before: {100 * before.accuracy:.1f}% ({sum(before.correct)}/{before.count})")

    if s.response_source == "sibling":
        judged = sibling_responses(task, problems, accuracy=s.sibling_accuracy, seed=s.seed)
    else:
        judged = own_responses(model, tokenizer, task, problems, seed=s.seed, temperature=s.temperature,
                               batch_size=s.generation_batch, progress=progress)  # fmt: skip
    records = arm_records(task, problems, judged, "nlft")
    wrong = sum(not j.correct for j in judged)
    say(f"== {len(records)} {s.response_source} responses judged: {len(records) - wrong} right, {wrong} wrong")
    files: dict[str, Path] = {}
    details = _saliency(model, tokenizer, records, s, config, out, files, progress)
    if "html" in files:
        say(f"saliency map of these records (the weights NLFT gives their tokens): {files['html']}")
        if "png" not in files:
            from nlft_kernels.saliency_map import NO_PNG

            say(NO_PNG)
    diagnostics = summarize(record_diagnostics(model, tokenizer, task, problems, judged, details=details))
    say(describe(diagnostics))

    say(f"== NLFT: {s.steps} steps of {s.batch_size} records, lr {s.lr:g}")
    args = NLFTTrainingArguments(
        max_steps=s.steps, learning_rate=s.lr, per_device_train_batch_size=s.batch_size, seed=s.seed,
        lora_r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, max_length=s.max_length,
        disable_tqdm=not progress,
    )  # fmt: skip
    model = train(model, tokenizer, records, args, config=config)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # faster decoding without the adapter's extra matmuls
    after = evaluate(model, tokenizer, task, test, **generation)
    seconds = time.perf_counter() - started
    device = device_name(next(model.parameters()).device)
    result = DemoResult(s, before, after, len(records), wrong, diagnostics, files, seconds, device)
    if out is not None:
        save_records(Path(out) / "records.jsonl", records)
        files["records"] = Path(out) / "records.jsonl"
        files["summary"] = Path(out) / "summary.json"
        files["summary"].write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    say(result.summary())
    return result


def _command() -> str:
    """The command line of this process, ``nlft ...`` when it is the nlft command."""
    import shlex

    if Path(sys.argv[0]).name in ("nlft", "__main__.py"):
        return shlex.join(["nlft", *sys.argv[1:]])
    return shlex.join(sys.argv)


def _saliency(model, tokenizer, records, s: DemoSettings, config: NLFTConfig, out, files: dict, progress: bool):
    """The records' saliency details, and their map written to ``out`` when it is given."""
    from nlft_kernels.saliency_map import saliency_details, write_saliency_map

    details = saliency_details(model, tokenizer, records, config=config, max_length=s.max_length, batch_size=8,
                               progress=progress)  # fmt: skip
    if out is not None:
        subtitle = f"task: {s.task}, {s.response_source} responses, before training"
        files.update(write_saliency_map(details, out, subtitle=subtitle, config=config))
    return details


__all__ = ["DemoResult", "DemoSettings", "run_demo"]
