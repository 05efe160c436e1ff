"""The paper's setting from the command line (every NLFTConfig and NLFTTrainingArguments field a
flag, the short aliases the README uses, dtype, 8-bit, LoRA, gradient checkpointing, epochs,
judge_nll_weight) and bad input (file and line named, missing fields named, truncation counted,
inputs never rewritten), on a tiny random Llama saved to a temporary folder."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields

import pytest
import torch
from transformers import TrainingArguments

from nlft_kernels.config import CLUSTER_CRITERIA, NLFTConfig
from nlft_kernels.recipes.cli import build_parser, parse_args
from nlft_kernels.recipes.commands.settings import nlft_config, training_arguments
from nlft_kernels.recipes.commands.train import DEFAULT_STEPS
from nlft_kernels.training import NLFTTrainingArguments, encode_record, save_records, train
from nlft_kernels.training.arguments import CHECKPOINTING_FIELD, WARMUP_FIELD
from nlft_kernels.training.data import response_ids
from nlft_kernels.training.trainer import steps_for_epochs
from tests._cli import REPO, bad_input, nlft_ok, run_nlft, write_jsonl
from tests._tiny import tiny_model, tiny_records, tiny_tokenizer

SEED = 0
TRAIN = ["train", "--data", __file__, "--out", "x"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = tiny_tokenizer()
    tiny_model(len(tokenizer), seed=SEED).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "records.jsonl"
    save_records(path, tiny_records())
    return path


def _other_value(f):
    """A valid value of field ``f`` that differs from its default."""
    if f.name == "cluster_criterion":
        return next(c for c in CLUSTER_CRITERIA if c != f.default)
    return f.default - 1 if isinstance(f.default, int) else f.default / 2


def test_every_nlft_config_field_is_a_flag():
    """Each field, set alone through its flag (HfArgumentParser's), reaches NLFTConfig; the others
    keep their defaults."""
    for f in fields(NLFTConfig):
        assert f.default is not MISSING and f.metadata.get("help"), f"{f.name} needs a default and help"
        value = _other_value(f)
        for flag in (f"--{f.name}", f"--{f.name.replace('_', '-')}"):
            for command in (TRAIN, ["demo"], ["saliency", "--data", __file__, "--out", "x"]):
                config = nlft_config(parse_args([*command, flag, str(value)]))
                assert config == NLFTConfig(**{f.name: value}), (f.name, command)


def test_every_training_field_is_a_flag():
    """Every field of NLFTTrainingArguments (transformers' and NLFT's) is a flag of `nlft train`, and
    every field of DemoSettings one of `nlft demo`: nothing is left out, and no list of them is
    kept by hand."""
    from nlft_kernels.recipes.demo import DemoSettings

    for name, settings in (("train", NLFTTrainingArguments), ("demo", DemoSettings)):
        parser = build_parser(only=name).commands[name]
        dests = {action.dest for action in parser._actions}
        missing = {f.name for f in fields(settings) if f.init} - dests
        assert not missing, f"nlft {name}: no flag for {sorted(missing)}"


def test_the_readme_flags_reach_the_arguments():
    """The short flags of the README (field aliases), each set alone, reach their field."""
    cases = {
        "max_steps": (["--steps", "7"], 7),
        "num_train_epochs": (["--epochs", "2.5"], 2.5),
        "per_device_train_batch_size": (["--batch-size", "3"], 3),
        "gradient_accumulation_steps": (["--grad-accum", "4"], 4),
        "learning_rate": (["--lr", "3e-5"], 3e-5),
        "lr_scheduler_type": (["--lr-scheduler", "cosine"], "cosine"),
        WARMUP_FIELD: (["--warmup-ratio", "0.1"], 0.1),
        CHECKPOINTING_FIELD: (["--gradient-checkpointing"], True),
        "seed": (["--seed", "5"], 5),
        "lora": (["--full"], False),
        "lora_r": (["--lora-r", "4"], 4),
        "lora_alpha": (["--lora-alpha", "32"], 32.0),
        "lora_dropout": (["--lora-dropout", "0.1"], 0.1),
        "lora_targets": (["--lora-targets", "q_proj,v_proj"], ["q_proj", "v_proj"]),
        "max_length": (["--max-length", "64"], 64),
        "judge_nll_weight": (["--judge-nll-weight", "10"], 10.0),
    }
    added = {f.name for f in fields(NLFTTrainingArguments)} - {f.name for f in fields(TrainingArguments)}
    assert added <= set(cases), "a field NLFTTrainingArguments adds is not in the README's flags"
    default = training_arguments(parse_args(TRAIN), DEFAULT_STEPS)
    assert isinstance(default, NLFTTrainingArguments) and default.max_steps == DEFAULT_STEPS
    for name, (argv, expected) in cases.items():
        got = training_arguments(parse_args(TRAIN + argv), DEFAULT_STEPS)
        value = getattr(got, name)
        value = getattr(value, "value", value)  # a SchedulerType
        assert value == expected and getattr(default, name) != expected, name
    epochs = training_arguments(parse_args([*TRAIN, "--epochs", "2"]), DEFAULT_STEPS)
    assert (epochs.max_steps, epochs.num_train_epochs) == (-1, 2.0)


def test_the_papers_command_parses():
    """The README's paper command (less --load-in-8bit's GPU) gives the paper's settings."""
    args = parse_args(
        [*TRAIN, "--dtype", "bf16", "--lora-r", "16", "--lora-alpha", "16", "--lora-dropout", "0.05",
         "--lora-targets", "gate_proj,up_proj,down_proj", "--gradient-checkpointing", "--epochs", "3", "--lr", "5e-5",
         "--lr-scheduler", "cosine", "--warmup-ratio", "0.1", "--batch-size", "1", "--grad-accum", "4",
         "--max-length", "8192", "--judge-nll-weight", "10", "--load-in-8bit"]
    )  # fmt: skip
    settings = training_arguments(args, DEFAULT_STEPS)
    assert (args.dtype, args.load_in_8bit, settings.lora_r, settings.lora_alpha, settings.lora_dropout) == (
        "bf16", True, 16, 16.0, 0.05)  # fmt: skip
    assert settings.lora_targets == ["gate_proj", "up_proj", "down_proj"] and getattr(settings, CHECKPOINTING_FIELD)
    assert (settings.num_train_epochs, settings.max_steps, settings.learning_rate) == (3.0, -1, 5e-5)
    assert (getattr(settings, WARMUP_FIELD), settings.per_device_train_batch_size) == (0.1, 1)
    assert (settings.gradient_accumulation_steps, settings.max_length, settings.judge_nll_weight) == (4, 8192, 10.0)
    assert settings.lr_scheduler_type.value == "cosine"


def test_bad_config_value_names_the_field(records_file, tmp_path):
    argv = ["train", "--data", records_file, "--out", tmp_path / "m", "--correct-threshold", "1.5"]
    assert "NLFTConfig.correct_threshold must be in (0, 1)" in bad_input(*argv)


def test_train_takes_the_paper_settings(capsys):
    """LoRA rank/alpha/dropout/targets, gradient checkpointing and epochs reach the model and the loop."""
    tokenizer = tiny_tokenizer()
    records = tiny_records()
    print(f"seed {SEED}")
    args = NLFTTrainingArguments(
        num_train_epochs=3, per_device_train_batch_size=2, gradient_accumulation_steps=1, lora_r=4, lora_alpha=8,
        lora_dropout=0.1, lora_targets=["q_proj", "down_proj"], lr_scheduler_type="cosine", judge_nll_weight=1.0,
        seed=SEED, disable_tqdm=False, **{CHECKPOINTING_FIELD: True, WARMUP_FIELD: 0.2},
    )  # fmt: skip
    model = train(tiny_model(len(tokenizer), seed=SEED), tokenizer, records, args, config=NLFTConfig(loss_scale=5.0))
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules)) == (
        4,
        8,
        0.1,
        {"q_proj", "down_proj"},
    )
    assert model.get_base_model().is_gradient_checkpointing
    steps = steps_for_epochs(len(records), 3, 2, 1)
    assert steps == 6 and f"{steps}/{steps}" in capsys.readouterr().err  # the bar ran 6 optimizer steps


def test_default_lora_targets_are_the_authors():
    tokenizer = tiny_tokenizer()
    args = NLFTTrainingArguments(max_steps=1, disable_tqdm=True)
    model = train(tiny_model(len(tokenizer), seed=SEED), tokenizer, tiny_records(), args)
    assert set(model.peft_config["default"].target_modules) == {"gate_proj", "up_proj", "down_proj"}


def test_cli_train_dtype_and_targets(model_dir, records_file, tmp_path):
    out = tmp_path / "trained"
    nlft_ok("train", "--model", model_dir, "--data", records_file, "--steps", "1", "--dtype", "bf16",
            "--lora-targets", "q_proj,v_proj", "--lora-r", "4", "--out", out)  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    message = bad_input("train", "--model", model_dir, "--data", records_file, "--steps", "1",
                        "--lora-targets", "no_such_proj", "--out", tmp_path / "x")  # fmt: skip
    assert "LoRA targets ['no_such_proj'] are not modules" in message


def test_warnings_show_one_line_each(model_dir, tmp_path):
    """A warning of this package prints as one `nlft <command>:` line; anyone else's (here a judge
    function's FutureWarning) as Python shows it: nothing is hidden or reworded."""
    hook = tmp_path / "old_judge.py"
    hook.write_text("import warnings\n\ndef judge(question, response, reference):\n"
                    "    warnings.warn('old_judge: use new_judge', FutureWarning)\n"
                    "    return True, None\n")  # fmt: skip
    responses = write_jsonl(tmp_path / "responses.jsonl", [{"question": "q", "answer": "#### 1", "response": "1"}])
    done = run_nlft("judge", "--in", responses, "--out", tmp_path / "records.jsonl", "--judge", f"{hook}:judge")
    assert done.returncode == 0 and f"{hook}:4: FutureWarning: old_judge: use new_judge" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_load_in_8bit_without_cuda_is_a_clear_error(model_dir, records_file, tmp_path):
    message = bad_input("train", "--model", model_dir, "--data", records_file, "--load-in-8bit", "--out",
                        tmp_path / "m")  # fmt: skip
    assert "need a CUDA GPU" in message


def test_lora_over_8bit_weights_is_saved_unmerged(model_dir, tmp_path):
    """The save-path choice: LoRA is merged on save, except over quantized base weights, whose
    adapter is saved alone. bitsandbytes needs a CUDA GPU, so the tiny CPU model gets the mark
    transformers' 8-bit loader sets (``is_loaded_in_8bit``); the folder written then holds the
    adapter only, and load_model puts it back onto its base model with the same outputs."""
    from peft import LoraConfig, get_peft_model

    from nlft_kernels.recipes.models import load_model, save_model, saves_adapter_only

    tokenizer = tiny_tokenizer()
    base, _ = load_model(str(model_dir))
    lora = LoraConfig(r=4, target_modules=["gate_proj", "down_proj"], init_lora_weights=False)  # a nonzero update
    model = get_peft_model(base, lora)
    assert not saves_adapter_only(model) and not saves_adapter_only(base)  # float weights: merged
    base.is_loaded_in_8bit = True
    assert saves_adapter_only(model) and not saves_adapter_only(base)
    assert save_model(model, tokenizer, tmp_path / "adapter") == "adapter"
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and "model.safetensors" not in saved
    ids = torch.tensor([[1, 7, 42, 99, 3]])
    with torch.no_grad():
        trained = model(ids).logits
        with model.disable_adapter():
            untrained = model(ids).logits
        loaded, _ = load_model(str(tmp_path / "adapter"))
        torch.testing.assert_close(loaded(ids).logits, trained)
    assert not torch.allclose(trained, untrained), "the adapter must change the outputs for this to show"


def test_load_in_8bit_trains_lora_only(records_file, tmp_path):
    message = bad_input("train", "--data", records_file, "--load-in-8bit", "--full", "--out", tmp_path / "m")
    assert "--load-in-8bit trains through LoRA only" in message


# ------------------------------------------------------------------------------ bad input


def test_long_responses_are_truncated_with_a_count(model_dir, records_file, tmp_path):
    """The count of truncated responses: one `nlft train:` line on stderr, the only one."""
    tokenizer = tiny_tokenizer()
    records = tiny_records()
    prompts = [max(e[f"{v}_prompt_length"] for v in ("base", "standard", "judge"))
               for e in (encode_record(r, tokenizer) for r in records)]  # fmt: skip
    max_length = max(prompts) + 3
    lengths = [len(response_ids(r.response, tokenizer)) for r in records]
    expected = sum(n > max_length - p for n, p in zip(lengths, prompts, strict=True))
    assert 0 < expected < len(records), "the cut must hit some records and spare others"
    before = records_file.read_bytes()
    count = f"nlft train: {expected} of {len(records)} responses truncated to fit max_length={max_length}"
    done = nlft_ok("train", "--model", model_dir, "--data", records_file, "--steps", "1", "--max-length", max_length,
                   "--out", tmp_path / "m", allowed=(count,))  # fmt: skip
    assert count in done.stderr
    assert records_file.read_bytes() == before  # the input is only read


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "responses.jsonl"
    good = json.dumps({"question": "q", "response": "r", "answer": "#### 1"})
    path.write_text(f"{good}\n\n{{not json\n{good}\n")
    assert f"{path}, line 3: not valid JSON" in bad_input("judge", "--in", path, "--out", tmp_path / "out.jsonl")


def test_record_missing_a_field_names_it(model_dir, tmp_path):
    rows = [{"question": "q", "response": "r", "answer": "a", "correct": True},
            {"question": "q", "answer": "a", "correct": True}]  # fmt: skip
    path = write_jsonl(tmp_path / "records.jsonl", rows)
    message = bad_input("train", "--model", model_dir, "--data", path, "--steps", "1", "--out", tmp_path / "m")
    assert f"{path}, line 2: missing field 'response' or 'output'" in message
    responses = write_jsonl(tmp_path / "responses.jsonl", [{"question": "q", "response": "r"}])
    assert "line 1: missing field answer" in bad_input("judge", "--in", responses, "--out", tmp_path / "out.jsonl")


def test_judge_input_lines_are_the_files_lines(tmp_path):
    """Blank lines count: a bad row and each output row name the line an editor shows, not the row's rank."""
    good = json.dumps({"question": "q", "response": "The answer is 1.", "answer": "#### 1"})
    bad = json.dumps({"question": "q", "response": "r"})
    path = tmp_path / "responses.jsonl"
    path.write_text(f"\n{good}\n\n\n{bad}\n")  # the bad row is the 2nd row, on line 5
    message = bad_input("judge", "--in", path, "--out", tmp_path / "out.jsonl")
    assert f"--in {path}, line 5: missing field answer" in message
    path.write_text(f"\n{good}\n\n\n{good}\n")
    nlft_ok("judge", "--in", path, "--out", tmp_path / "out.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [2, 5] and all(r["correct"] for r in rows)


def test_generate_never_writes_over_its_input(tmp_path):
    data = write_jsonl(tmp_path / "questions.jsonl", [{"question": "q", "answer": "#### 1"}])
    before = data.read_bytes()
    assert "inputs are never rewritten" in bad_input("generate", "--data", data, "--out", data)
    assert data.read_bytes() == before


def test_generate_never_writes_over_a_folders_split(tmp_path):
    """--data a folder: its {split}.jsonl is the input, protected as a file given by name is."""
    data = tmp_path / "gsm8k" / "train.jsonl"
    data.parent.mkdir()
    write_jsonl(data, [{"question": "q", "answer": "#### 1"}])
    before = data.read_bytes()
    assert "inputs are never rewritten" in bad_input("generate", "--data", data.parent, "--out", data)
    assert data.read_bytes() == before


def test_the_docs_paper_config_is_the_papers_command(tmp_path):
    """docs/cli.md's paper.yaml gives what the paper's command line gives (flags and file agree)."""
    text = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    config = tmp_path / "paper.yaml"
    config.write_text(text.split("```yaml\n", 1)[1].split("```", 1)[0], encoding="utf-8")
    from_file = parse_args([*TRAIN, "--config", str(config)])
    flags = parse_args(
        [*TRAIN, "--model", "meta-llama/Meta-Llama-3-8B", "--load-in-8bit", "--dtype", "bf16", "--lora-r", "16",
         "--lora-alpha", "16", "--lora-dropout", "0.05", "--gradient-checkpointing", "--epochs", "3", "--lr", "5e-5",
         "--lr-scheduler", "cosine", "--warmup-ratio", "0.1", "--batch-size", "1", "--grad-accum", "4",
         "--max-length", "8192", "--judge-nll-weight", "10"]
    )  # fmt: skip
    assert vars(from_file) | {"config": None} == vars(flags) | {"config": None}
    assert training_arguments(from_file, DEFAULT_STEPS).to_dict() == training_arguments(flags, DEFAULT_STEPS).to_dict()
