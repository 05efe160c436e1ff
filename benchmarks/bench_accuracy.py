"""Does NLFT beat SFT with little data? GSM8K accuracy after SFT and after NLFT on the same questions.

    python -m benchmarks.bench_accuracy              # the committed CPU run (SmolLM2-135M, ~1 h)
    python -m benchmarks.bench_accuracy --model meta-llama/Meta-Llama-3-8B --n 50 200 800

For each training-set size n, the same n GSM8K training questions train two LoRA adapters from
the same base model, with the same LoRA (r, alpha, dropout, targets), optimizer steps, batch
size, learning rate and seed (so the same adapter initialisation and the same batch order):

- **SFT** on the reference solutions (GSM8K's, with the calculator annotations ``<<...>>``
  removed and ``#### N`` written as ``The answer is N.``, the form our instruction asks for);
- **NLFT** on the model's own responses (sampled once per question at ``--temperature``),
  judged by the rule-based GSM8K judge (:func:`nlft_kernels.recipes.rule_judge.judge_response`), with the
  reference solution as the standard view and the judgment as the judge view.

This is the design of the authors' later table (SFT on references vs NLFT on responses; spec,
"Reported results"). Every model (the base one too) is evaluated on one fixed subset of the GSM8K
test split with greedy decoding. Each accuracy has a 95% Wilson interval over the test questions;
NLFT - SFT has a paired bootstrap interval and McNemar's exact p-value (same questions, same
seed: the pairs are what differs). One training seed per run: the intervals cover the choice of
test questions, not the training seed's noise.

The JSON is rewritten after every stage (sampling, judging, each evaluation and training run), so
a crash or Ctrl-C loses at most the stage that was running; ``--resume`` continues from it.
Output: ``benchmarks/results/accuracy_<device>_<date>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks._util import command_line, environment, now_iso, pyplot, result_path, save_figure

# The authors' later table (spec, "Reported results"): Llama-3-8B, LoRA, both on the same CoT
# outputs; accuracy in % per (samples, epochs).
AUTHORS_TABLE = (
    {"samples": 25, "epochs": 5, "sft": 16.34, "nlft": 58.38},
    {"samples": 50, "epochs": 5, "sft": 45.78, "nlft": 63.46},
    {"samples": 800, "epochs": 3, "sft": 65.80, "nlft": 67.80},
)


@dataclass(frozen=True)
class StudySettings:
    """What one study trains and evaluates; recorded whole in the JSON."""

    n: tuple[int, ...] = (50, 200)  # training-set sizes (nested: the 50 are the 200's first 50)
    test_size: int = 200  # fixed subset of the test split
    epochs: int = 2
    batch_size: int = 4
    lr: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    max_length: int = 448  # prompt + response tokens per view in training
    # Generation dominates the CPU run (5 evaluations + 1 sampling pass, ~0.4 s per decoding step
    # of 32 rows on 2 cores): these caps keep it near an hour; SmolLM2's GSM8K answers mostly fit.
    sample_tokens: int = 160  # max new tokens of the sampled training responses
    temperature: float = 0.7  # of the sampled training responses
    eval_tokens: int = 192  # max new tokens of the greedy evaluation
    generation_batch: int = 32
    seed: int = 0

    def steps(self, n: int) -> int:
        """Optimizer steps for ``n`` records: ``epochs`` passes in batches of ``batch_size``."""
        return math.ceil(self.epochs * n / self.batch_size)


PRESETS = {
    "cpu": StudySettings(),
    # A few minutes: 8 training questions, 16 test questions, short generations.
    "quick": StudySettings(n=(8,), test_size=16, epochs=1, sample_tokens=96, eval_tokens=128),
    # The tests' size: seconds on a tiny random model.
    "tiny": StudySettings(
        n=(2, 4),
        test_size=4,
        epochs=1,
        batch_size=2,
        max_length=512,
        sample_tokens=8,
        eval_tokens=8,
        generation_batch=4,
    ),
}


# ------------------------------------------------------------------------------ statistics


def wilson_interval(correct: int, count: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``correct / count`` (0..1)."""
    if count == 0:
        return (0.0, 1.0)
    p = correct / count
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    # At p = 0 or 1 the interval touches the observed value exactly (rounding would miss it).
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == count else min(1.0, centre + half)
    return (low, high)


def paired_bootstrap(a: list[bool], b: list[bool], resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of ``mean(b) - mean(a)`` over questions resampled with replacement
    (the same resampled questions for both: a paired interval)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap needs two equally long, non-empty lists")
    rng = random.Random(seed)
    diffs = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return (means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))])


def mcnemar_exact(a: list[bool], b: list[bool]) -> float:
    """Two-sided exact McNemar p-value: are the discordant pairs (right under one, wrong under the
    other) split unevenly? 1.0 when there are none."""
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def accuracy_fields(correct: list[bool]) -> dict:
    """Accuracy, count and its 95% Wilson interval, for a result row."""
    hits = sum(correct)
    low, high = wilson_interval(hits, len(correct))
    return {"accuracy": hits / len(correct), "correct": hits, "count": len(correct), "ci95": [low, high]}


# ---------------------------------------------------------------------------------- data


_ANNOTATION = re.compile(r"<<[^>]*>>")
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")


def sft_target(solution: str) -> str:
    """GSM8K's reference solution in the form the instruction asks for: no ``<<a*b=c>>`` calculator
    annotations, and ``#### N`` written as ``The answer is N.``"""
    text = _ANNOTATION.sub("", solution).strip()
    return _FINAL.sub(lambda m: f"\nThe answer is {m.group(1).replace(',', '')}.", text)


def choose(rows: list[dict], size: int, seed: int, exclude: set[int] = frozenset()) -> list[int]:
    """``size`` row indices drawn with ``random.Random(seed)`` (in drawing order, so that a prefix
    of a larger draw is a smaller one)."""
    pool = [i for i in range(len(rows)) if i not in exclude]
    if size > len(pool):
        raise ValueError(f"asked for {size} rows, the data has {len(pool)}")
    return random.Random(seed).sample(pool, size)


# ------------------------------------------------------------------------------ training


def fit(model, tokenizer, features: list[dict], method: str, settings: StudySettings, steps: int, progress: bool):
    """Train ``model``'s LoRA adapter for ``steps`` optimizer steps on ``features`` (from
    :func:`nlft_kernels.training.data.encode_records`): ``method`` "sft" is the token-mean
    cross-entropy of the base view, "nlft" the NLFT loss (:func:`nlft_kernels.training.nlft_step`).
    Batches cycle through ``features`` in an order drawn from ``settings.seed`` (the same for
    both methods). Returns the per-step losses."""
    from tqdm.auto import tqdm

    from nlft_kernels.training.data import NLFTCollator, pad_token_id_of
    from nlft_kernels.training.trainer import nlft_step

    pad = pad_token_id_of(tokenizer)
    collate = NLFTCollator(pad)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    rng = random.Random(settings.seed)
    order: list[int] = []
    losses = []
    model.train()
    bar = tqdm(range(steps), desc=f"{method} train", disable=not progress)
    for _ in bar:
        picked = []
        while len(picked) < min(settings.batch_size, len(features)):
            if not order:
                order = list(range(len(features)))
                rng.shuffle(order)
            picked.append(features[order.pop()])
        batch = collate(picked)
        loss = nlft_step(model, batch, pad_token_id=pad) if method == "nlft" else sft_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    return losses


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the response tokens under the base view (transformers' own loss: the
    label of position ``p`` is the token at ``p + 1``)."""
    ids, mask, rows, labels = (batch[k] for k in ("base_input_ids", "base_attention_mask", "base_rows", "labels"))
    targets = torch.full_like(ids, -100)
    keep = labels != -100
    b, r = keep.nonzero(as_tuple=True)
    targets[b, rows[b, r] + 1] = labels[b, r]
    return model(input_ids=ids, attention_mask=mask, labels=targets).loss


# ---------------------------------------------------------------------------------- study


class Study:
    """One run of the study: its settings, data, model and the payload it keeps writing."""

    def __init__(self, args: argparse.Namespace, settings: StudySettings, argv: list[str]):
        self.args, self.settings = args, settings
        device = torch.device("cpu")
        self.out = result_path(Path(args.out) if args.out else None, "accuracy", device)
        previous = json.loads(self.out.read_text()) if args.resume and self.out.is_file() else None
        if previous:
            recorded, wanted = previous["settings"], _settings_json(settings)
            same_but_n = {k: v for k, v in recorded.items() if k != "n"} == {
                k: v for k, v in wanted.items() if k != "n"
            }
            if not same_but_n or not set(wanted["n"]) <= set(recorded["n"]):
                sys.exit(f"--resume: {self.out} was written with other settings; remove it or change --out")
            if wanted["n"] != recorded["n"]:
                # Fewer training-set sizes than planned (e.g. the rest would not fit the time there
                # is): the sampled responses and subsets stay those of the planned run.
                dropped = sorted(set(recorded["n"]) - set(wanted["n"]))
                previous.setdefault("notes", []).append(
                    f"planned n={recorded['n']}; resumed with n={wanted['n']}: n={dropped} not run"
                )
                previous["settings"] = wanted
                previous["runs"] = {
                    k: v
                    for k, v in previous.get("runs", {}).items()
                    if k == "base" or int(k.rsplit("_n", 1)[1]) in wanted["n"]
                }
        self.payload = previous or {
            "benchmark": "bench_accuracy",
            "question": "GSM8K accuracy after SFT on reference solutions vs NLFT on judged own responses",
            **environment(device),
            "date": now_iso(),
            "command": command_line("benchmarks.bench_accuracy", argv),
            "model": args.model or "smollm2 (embedded SmolLM2-135M-Instruct, float32)",
            "settings": _settings_json(settings),
            "notes": [],
            "authors_table": list(AUTHORS_TABLE),
            "complete": False,
        }
        self.payload.setdefault("runs", {})
        self.payload["resumed_at"] = now_iso() if previous else None
        if previous:
            self.payload["resumed_command"] = command_line("benchmarks.bench_accuracy", argv)

    def save(self) -> None:
        """Rewrite the JSON (atomically: a crash while writing leaves the previous file)."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.payload, indent=1) + "\n")
        os.replace(tmp, self.out)

    def say(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _settings_json(settings: StudySettings) -> dict:
    return json.loads(json.dumps(asdict(settings)))


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from nlft_kernels.recipes.generation import GSM8K_INSTRUCTION, evaluate_gsm8k, generate_responses
    from nlft_kernels.recipes.models import load_model
    from nlft_kernels.recipes.rule_judge import judge_response
    from nlft_kernels.training.data import NLFTRecord, encode_records
    from nlft_kernels.training.trainer import add_lora

    settings = PRESETS[args.preset]
    overrides = {
        k: getattr(args, k) for k in ("n", "test_size", "epochs", "lr", "seed") if getattr(args, k) is not None
    }
    settings = replace(settings, **{k: tuple(v) if k == "n" else v for k, v in overrides.items()})
    torch.set_num_threads(args.threads or torch.get_num_threads())
    study = Study(args, settings, argv)
    payload, runs = study.payload, study.payload["runs"]
    if settings.n != (50, 200) or settings.test_size != 200:
        payload["notes"] = payload["notes"] + [
            f"reduced from the study's design (n in 50, 200; 200 test questions): n={list(settings.n)}, "
            f"{settings.test_size} test questions"
        ]
    payload["notes"].append("one training seed; responses judged by the rule-based GSM8K judge")
    payload["notes"] = list(dict.fromkeys(payload["notes"]))
    progress = not args.no_progress

    train_rows, test_rows = _read(args.data, "train"), _read(args.data, "test")
    test_index = choose(test_rows, settings.test_size, settings.seed)
    # A resumed run keeps its recorded subsets (its sampled responses belong to them).
    train_index = payload.get("train_indices") or choose(train_rows, max(settings.n), settings.seed + 1)
    payload["test_indices"], payload["train_indices"] = test_index, train_index
    test = [test_rows[i] for i in test_index]
    base = tokenizer = None
    todo = (
        "base" not in runs
        or "sampled" not in payload
        or any(f"{m}_n{n}" not in runs for n in settings.n for m in ("sft", "nlft"))
    )
    if todo:  # a resumed run with every result recorded only writes its reports
        started = time.perf_counter()
        base, tokenizer = load_model(args.model)
        study.say(f"model loaded in {time.perf_counter() - started:.0f} s")

    def evaluate(model, name: str) -> dict:
        t0 = time.perf_counter()
        result = evaluate_gsm8k(
            model,
            tokenizer,
            test,
            n=None,
            batch_size=settings.generation_batch,
            max_new_tokens=settings.eval_tokens,
            progress=progress,
        )
        correct = [s["correct"] for s in result["samples"]]
        row = accuracy_fields(correct) | {
            "per_question": correct,
            "eval_seconds": time.perf_counter() - t0,
            "responses_sample": [s["response"] for s in result["samples"][:3]],
        }
        study.say(
            f"{name}: {row['correct']}/{row['count']} = {row['accuracy']:.1%} "
            f"(95% CI {row['ci95'][0]:.1%}-{row['ci95'][1]:.1%})"
        )
        return row

    if "base" not in runs:
        runs["base"] = evaluate(base, "base model")
        study.save()

    # The model's own responses to the training questions, sampled once, then judged.
    if "sampled" not in payload:
        t0 = time.perf_counter()
        questions = [train_rows[i]["question"] for i in train_index]
        responses = generate_responses(
            base,
            tokenizer,
            questions,
            batch_size=settings.generation_batch,
            max_new_tokens=settings.sample_tokens,
            greedy=False,
            temperature=settings.temperature,
            seed=settings.seed,
            progress=progress,
            desc="sample",
        )
        judged = []
        for i, response in zip(train_index, responses, strict=True):
            row = train_rows[i]
            verdict = judge_response(row["question"], response, row["answer"])
            judged.append({"index": i, "response": response, "correct": verdict.correct, "judgment": verdict.judgment})
        payload["sampled"] = judged
        payload["sampling_seconds"] = time.perf_counter() - t0
        study.save()
        study.say(f"sampled and judged {len(judged)} responses: {sum(j['correct'] for j in judged)} correct")

    for n in settings.n:
        own = payload["sampled"][:n]
        records = {
            "sft": [
                NLFTRecord(
                    train_rows[j["index"]]["question"],
                    sft_target(train_rows[j["index"]]["answer"]),
                    train_rows[j["index"]]["answer"],
                    None,
                    True,
                    GSM8K_INSTRUCTION,
                )
                for j in own
            ],
            "nlft": [
                NLFTRecord(
                    train_rows[j["index"]]["question"],
                    j["response"],
                    train_rows[j["index"]]["answer"],
                    None if j["correct"] else j["judgment"],
                    j["correct"],
                    GSM8K_INSTRUCTION,
                )
                for j in own
            ],
        }
        steps = settings.steps(n)
        for method in ("sft", "nlft"):
            key = f"{method}_n{n}"
            if key in runs:
                study.say(f"{key}: already in {study.out}, skipped")
                continue
            features = encode_records(records[method], tokenizer, max_length=settings.max_length)
            if not features:
                raise SystemExit(f"{key}: no record fits max_length={settings.max_length}; raise it")
            torch.manual_seed(settings.seed)  # the same adapter initialisation for both methods
            model = add_lora(copy.deepcopy(base), settings.lora_r, settings.lora_alpha, settings.lora_dropout)
            t0 = time.perf_counter()
            losses = fit(model, tokenizer, features, method, settings, steps, progress)
            train_seconds = time.perf_counter() - t0
            model = model.merge_and_unload()  # evaluation decodes faster without the adapter's extra matmuls
            row = evaluate(model, key)
            runs[key] = row | {
                "method": method,
                "n": n,
                "steps": steps,
                "records": len(features),
                "wrong_records": sum(not r.correct for r in records[method]),
                "train_seconds": train_seconds,
                "seconds_per_step": train_seconds / steps,
                "loss_first": losses[0],
                "loss_last": losses[-1],
                "losses": losses,
            }
            del model
            study.save()

    payload["comparisons"] = comparisons(runs, settings)
    payload["complete"] = True
    payload["finished"] = now_iso()
    study.save()
    write_markdown(payload, study.out.with_suffix(".md"))
    png = plot(payload, study.out.with_suffix(".png"))
    study.say(f"wrote {study.out}, {study.out.with_suffix('.md')}" + (f", {png}" if png else ""))
    return payload


def _read(data: str | None, split: str) -> list[dict]:
    from nlft_kernels.recipes.errors import BadInput
    from nlft_kernels.recipes.questions import read_data

    try:
        return read_data(data, split)
    except BadInput as err:  # as a bad flag of this script: its usage and exit status 2
        argparse.ArgumentParser(prog="python -m benchmarks.bench_accuracy").error(str(err))


def comparisons(runs: dict, settings: StudySettings) -> list[dict]:
    """Per n: NLFT - SFT and each - base, with paired 95% bootstrap intervals and McNemar p."""
    out = []
    for n in settings.n:
        sft, nlft = runs.get(f"sft_n{n}"), runs.get(f"nlft_n{n}")
        if not (sft and nlft):
            continue
        for label, a, b in (
            ("nlft - sft", sft, nlft),
            ("sft - base", runs["base"], sft),
            ("nlft - base", runs["base"], nlft),
        ):
            low, high = paired_bootstrap(a["per_question"], b["per_question"], seed=settings.seed)
            out.append(
                {
                    "n": n,
                    "comparison": label,
                    "difference": b["accuracy"] - a["accuracy"],
                    "ci95": [low, high],
                    "mcnemar_p": mcnemar_exact(a["per_question"], b["per_question"]),
                }
            )
    return out


# ------------------------------------------------------------------------------- reports


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def write_markdown(payload: dict, path: Path) -> Path:
    """Write :func:`markdown_table` of ``payload`` to ``path``."""
    path.write_text(markdown_table(payload) + "\n")
    return path


def markdown_table(payload: dict) -> str:
    """The Markdown of a finished study: accuracy with its interval per run, the paired
    differences, and the authors' table beside it."""
    s, runs = payload["settings"], payload["runs"]
    lines = [
        f"GSM8K accuracy, {payload['model']}, greedy decoding on {s['test_size']} test questions "
        f"({payload['device']}, {payload['date'][:10]}); LoRA r={s['lora_r']} alpha={s['lora_alpha']}, "
        f"{s['epochs']} epochs, batch {s['batch_size']}, lr {s['lr']}, seed {s['seed']}. "
        "95% Wilson intervals; differences with paired bootstrap intervals and McNemar's exact p.",
        "",
        "| model | training samples | steps | accuracy | 95% CI |",
        "|---|---:|---:|---:|---|",
    ]
    base = runs["base"]
    lines.append(f"| base | 0 | 0 | {_pct(base['accuracy'])} | {_pct(base['ci95'][0])} - {_pct(base['ci95'][1])} |")
    for key, row in runs.items():
        if key == "base":
            continue
        lines.append(
            f"| {row['method'].upper()} | {row['n']} | {row['steps']} | {_pct(row['accuracy'])} | "
            f"{_pct(row['ci95'][0])} - {_pct(row['ci95'][1])} |"
        )
    summary = []
    for c in payload.get("comparisons", []):
        if c["comparison"] == "nlft - sft":
            nlft, sft = runs[f"nlft_n{c['n']}"]["accuracy"], runs[f"sft_n{c['n']}"]["accuracy"]
            ci = f"95% CI {100 * c['ci95'][0]:+.1f} to {100 * c['ci95'][1]:+.1f}"
            summary.append(
                f"n = {c['n']}: NLFT {_pct(nlft)} vs SFT {_pct(sft)}, a difference of "
                f"{100 * c['difference']:+.1f} points ({ci}; McNemar p = {c['mcnemar_p']:.3f})"
            )
    if summary:
        lines = ["**Result:** " + "; ".join(summary) + ".", ""] + lines
    lines += ["", "| n | comparison | difference | 95% CI | McNemar p |", "|---:|---|---:|---|---:|"]
    for c in payload.get("comparisons", []):
        lines.append(
            f"| {c['n']} | {c['comparison']} | {100 * c['difference']:+.1f} pts | "
            f"{100 * c['ci95'][0]:+.1f} to {100 * c['ci95'][1]:+.1f} | {c['mcnemar_p']:.3f} |"
        )
    lines += [
        "",
        "The authors' later table (Llama-3-8B with LoRA, both methods on the same CoT outputs; another "
        "model and regime, not directly comparable):",
        "",
        "| samples | epochs | SFT | NLFT |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['samples']} | {r['epochs']} | {r['sft']:.2f}% | {r['nlft']:.2f}% |" for r in payload["authors_table"]
    ]
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> Path | None:
    """Bars of accuracy per (method, n) with 95% intervals, the base model as a line."""
    plt = pyplot()
    if plt is None:
        return None
    runs, ns = payload["runs"], payload["settings"]["n"]
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.38
    for k, (method, colour) in enumerate((("sft", "tab:blue"), ("nlft", "tab:orange"))):
        rows = [runs.get(f"{method}_n{n}") for n in ns]
        xs = [i + (k - 0.5) * width for i, r in enumerate(rows) if r]
        acc = [100 * r["accuracy"] for r in rows if r]
        err = [
            [100 * (r["accuracy"] - r["ci95"][0]) for r in rows if r],
            [100 * (r["ci95"][1] - r["accuracy"]) for r in rows if r],
        ]
        ax.bar(xs, acc, width, yerr=err, capsize=4, color=colour, label=method.upper())
    base = runs["base"]
    ax.axhline(100 * base["accuracy"], color="grey", linestyle="--", label=f"base {_pct(base['accuracy'])}")
    ax.set_xticks(range(len(ns)), [f"n = {n}" for n in ns])
    ax.set_ylabel(f"GSM8K accuracy (%), {payload['settings']['test_size']} test questions")
    ax.set_title(f"SFT vs NLFT, {payload['model'].split(' (')[0]} ({payload['date'][:10]})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help=f"sizes (default cpu: {PRESETS['cpu']})")
    p.add_argument("--model", help="Hugging Face model path or hub name (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="GSM8K folder with train.jsonl/test.jsonl, or a hub name (default: as `nlft eval`)")
    p.add_argument("--n", type=int, nargs="+", help="training-set sizes (overrides the preset's)")
    p.add_argument("--test-size", type=int, help="test questions (overrides the preset's)")
    p.add_argument("--epochs", type=int, help="epochs over each training set (overrides the preset's)")
    p.add_argument("--lr", type=float, help="learning rate (overrides the preset's)")
    p.add_argument("--seed", type=int, help="seed of the subsets, sampling, adapter and batch order")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/accuracy_<device>_<date>.json)")
    p.add_argument("--resume", action="store_true", help="continue the run recorded in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("n", "test_size", "epochs"):
        value = getattr(args, name)
        if value is not None and min(value if isinstance(value, list) else [value]) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return run(args, argv)


if __name__ == "__main__":
    main()
