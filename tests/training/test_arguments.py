"""NLFTTrainingArguments: a TrainingArguments with help on every new field, checked on creation;
train(model, tokenizer, records, args) runs NLFTTrainer on it (tiny random Llama)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import transformers

from nlft_kernels import NLFTConfig
from nlft_kernels.training import NLFTTrainingArguments, train
from nlft_kernels.training.arguments import WARMUP_FIELD
from tests._tiny import tiny_model, tiny_records, tiny_tokenizer

SEED = 3
NEW_FIELDS = {f.name for f in dataclasses.fields(NLFTTrainingArguments)} - {
    f.name for f in dataclasses.fields(transformers.TrainingArguments)
}


def test_a_training_arguments_with_help_on_every_field_it_adds_or_changes():
    assert issubclass(NLFTTrainingArguments, transformers.TrainingArguments)
    assert {"lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "max_length", "judge_nll_weight"} <= (
        NEW_FIELDS
    )
    own = NLFTTrainingArguments.__dataclass_fields__
    changed = [n for n in ("learning_rate", "lr_scheduler_type", "save_strategy", "report_to", "seed") if n in own]
    for name in sorted(NEW_FIELDS) + changed:
        assert own[name].metadata.get("help"), f"{name} has no help"
    args = NLFTTrainingArguments()
    assert (args.save_strategy, args.report_to, args.save_to) == ("no", [], None)  # no folders, no integrations


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"lora_r": 0}, "lora_r must be a whole number >= 1, got 0"),
        ({"lora_alpha": -1.0}, "lora_alpha must be a positive"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
        ({"lora_targets": []}, "lora_targets must name at least one module"),
        ({"max_length": 0}, "max_length must be a whole number >= 1, got 0"),
        ({"judge_nll_weight": float("nan")}, "judge_nll_weight must be a finite number >= 0"),
    ],
)
def test_bad_settings_are_refused_on_creation(setting, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        NLFTTrainingArguments(**setting)


def test_targets_from_a_comma_list_and_constant_schedule_after_warmup():
    args = NLFTTrainingArguments(max_steps=4, lora_targets="q_proj, v_proj", **{WARMUP_FIELD: 0.25})
    assert args.lora_targets == ["q_proj", "v_proj"] and args.max_steps == 4
    assert args.lr_scheduler_type == "constant_with_warmup"  # transformers' "constant" would skip the warm-up
    assert NLFTTrainingArguments(max_steps=4).lr_scheduler_type == "constant"


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _args(**settings) -> NLFTTrainingArguments:
    return NLFTTrainingArguments(seed=SEED, disable_tqdm=True, **settings)


def test_train_takes_the_arguments_and_nothing_else(tmp_path, monkeypatch):
    """train(model, tokenizer, records, args) is the one entry point: the same args give the same
    LoRA weights, which did move; no folder is written where none was named; the settings come
    in args only (a keyword or another arguments class is refused)."""
    monkeypatch.chdir(tmp_path)
    tok = tiny_tokenizer()
    lora = dict(lora_r=4, lora_alpha=8.0, lora_targets=["q_proj", "down_proj"])
    print(f"seed {SEED}")
    config = NLFTConfig(loss_scale=5.0)
    # The adapter as initialised (a step too small to move it): training must move it from there.
    untrained = train(
        tiny_model(len(tok), seed=SEED), tok, tiny_records(), _args(max_steps=1, learning_rate=1e-30, **lora)
    )
    initial = _trainable(untrained)
    args = _args(
        max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
        lr_scheduler_type="cosine", judge_nll_weight=1.0, **{WARMUP_FIELD: 0.3}, **lora,
    )  # fmt: skip
    first = train(tiny_model(len(tok), seed=SEED), tok, tiny_records(), args, config=config)
    again = train(tiny_model(len(tok), seed=SEED), tok, tiny_records(), args, config=config)
    a, b = _trainable(first), _trainable(again)
    assert a.keys() == b.keys() == initial.keys() and any("lora_B" in n for n in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(a[n], initial[n]) for n in a if "lora_B" in n)  # training moved the adapter
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="steps"):
        train(first, tok, tiny_records(), args, steps=1)
    with pytest.raises(TypeError, match="args must be NLFTTrainingArguments"):
        train(first, tok, tiny_records(), transformers.TrainingArguments(output_dir=str(tmp_path / "x")))


def test_output_dir_holds_the_model_and_no_checkpoint(tmp_path):
    tok = tiny_tokenizer()
    out = tmp_path / "out"
    train(tiny_model(len(tok), seed=SEED), tok, tiny_records(), _args(max_steps=2, output_dir=str(out)))
    saved = sorted(p.name for p in out.iterdir())
    assert "adapter_config.json" in saved and "tokenizer_config.json" in saved
    assert not [name for name in saved if name.startswith("checkpoint")], saved
