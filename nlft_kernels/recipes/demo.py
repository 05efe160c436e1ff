"""The demo as a library function: accuracy before, NLFT on a stronger sibling's judged
responses, accuracy after, and the saliency map of the records it trained on.

    from nlft_kernels.recipes.demo import run_demo
    result = run_demo(out="nlft-demo")          # the arithmetic task, about three minutes on 2 cores
    print(result.summary())                     # before 38.0% (...) -> after ...% (...)

``nlft demo`` calls :func:`run_demo` with its flags. The defaults (:class:`DemoSettings`) were
chosen by measurement so that before -> after moves visibly on 2 CPU cores in a few minutes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nlft_kernels.recipes.study import Evaluation, arm_records, evaluate, sibling_responses


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains and evaluates.

    task: a name of :func:`nlft_kernels.recipes.tasks.get_task`; train_size questions, answered
    by the sibling solver (right with probability ``sibling_accuracy``) and judged by the task's
    judge; ``steps`` NLFT steps of ``batch_size`` records at ``lr`` (LoRA r=``lora_r``);
    test_size greedy test questions before and after; seed: the questions, responses, LoRA
    initialisation and record order.
    """

    task: str = "add2"
    train_size: int = 48
    test_size: int = 100
    sibling_accuracy: float = 0.8
    steps: int = 24
    batch_size: int = 4
    lr: float = 1e-3
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0
    generation_batch: int = 50
    max_length: int = 512


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

    def summary(self) -> str:
        """One line: before -> after with intervals, the training, the time."""
        b, a = self.before, self.after
        return (
            f"{self.settings.task} accuracy on {a.count} test questions: before {100 * b.accuracy:.1f}% "
            f"(95% CI {100 * b.ci95[0]:.1f}-{100 * b.ci95[1]:.1f}) -> after {100 * a.accuracy:.1f}% "
            f"(95% CI {100 * a.ci95[0]:.1f}-{100 * a.ci95[1]:.1f}); {self.settings.steps} NLFT steps on "
            f"{self.records} responses ({self.wrong_records} wrong), {self.seconds:.0f} s"
        )

    def to_dict(self) -> dict:
        return {
            "settings": asdict(self.settings),
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
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> DemoResult:
    """Evaluate, train with NLFT (:func:`nlft_kernels.training.train`) on the sibling's judged
    responses, evaluate again; write ``out/saliency.{html,png,jsonl}`` (the records' saliency
    map at the start of training), ``out/records.jsonl`` and ``out/summary.json`` (``out``
    None: nothing written). ``model``/``tokenizer``: default the embedded SmolLM2-135M-Instruct.
    The model is trained in place (its LoRA adapter merged at the end)."""
    from nlft_kernels.recipes.diagnostics import describe, record_diagnostics, summarize
    from nlft_kernels.recipes.tasks import get_task
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
    before = evaluate(model, tokenizer, task, test, batch_size=s.generation_batch, progress=progress)
    say(f"before: {100 * before.accuracy:.1f}% ({sum(before.correct)}/{before.count})")

    judged = sibling_responses(task, problems, accuracy=s.sibling_accuracy, seed=s.seed)
    records = arm_records(task, problems, judged, "nlft")
    wrong = sum(not j.correct for j in judged)
    say(f"== {len(records)} sibling responses judged: {len(records) - wrong} right, {wrong} wrong")
    files: dict[str, Path] = {}
    details = _saliency(model, tokenizer, records, s, out, files, progress)
    diagnostics = summarize(record_diagnostics(model, tokenizer, task, problems, judged, details=details))
    say(describe(diagnostics))

    say(f"== NLFT: {s.steps} steps of {s.batch_size} records, lr {s.lr:g}")
    args = NLFTTrainingArguments(
        max_steps=s.steps, learning_rate=s.lr, per_device_train_batch_size=s.batch_size, seed=s.seed,
        lora_r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, max_length=s.max_length,
        disable_tqdm=not progress,
    )  # fmt: skip
    model = train(model, tokenizer, records, args)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # faster decoding without the adapter's extra matmuls
    after = evaluate(model, tokenizer, task, test, batch_size=s.generation_batch, progress=progress)
    result = DemoResult(s, before, after, len(records), wrong, diagnostics, files, time.perf_counter() - started)
    if out is not None:
        save_records(Path(out) / "records.jsonl", records)
        files["records"] = Path(out) / "records.jsonl"
        files["summary"] = Path(out) / "summary.json"
        files["summary"].write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    say(result.summary())
    return result


def _saliency(model, tokenizer, records, s: DemoSettings, out, files: dict, progress: bool) -> list:
    """The records' saliency details, and their map written to ``out`` when it is given."""
    from nlft_kernels.saliency_map import saliency_details, write_saliency_map

    details = saliency_details(model, tokenizer, records, max_length=s.max_length, batch_size=8, progress=progress)
    if out is not None:
        files.update(write_saliency_map(details, out, subtitle=f"task: {s.task}, sibling responses, before training"))
    return details


__all__ = ["DemoResult", "DemoSettings", "run_demo"]
