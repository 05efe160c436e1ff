"""The paper's setting from the command line (every NLFTConfig field, dtype, 8-bit, LoRA, gradient
checkpointing, epochs, judge_nll_weight) and bad input (file and line named, missing fields named,
truncation counted, inputs never rewritten), on a tiny random Llama saved to a temporary folder."""

from __future__ import annotations

import json
import warnings
from dataclasses import MISSING, fields

import pytest
import torch
from transformers import TrainingArguments

from nlft_kernels.config import CLUSTER_CRITERIA, NLFTConfig
from nlft_kernels.recipes.cli import (
    build_parser,
    main,
    nlft_config_from_args,
    train_flag_fields,
    training_arguments_from_args,
)
from nlft_kernels.training import NLFTTrainingArguments, encode_record, save_records, train
from nlft_kernels.training.arguments import CHECKPOINTING_FIELD, WARMUP_FIELD
from nlft_kernels.training.data import response_ids
from nlft_kernels.training.trainer import steps_for_epochs
from tests._cli import cli_error, write_jsonl
from tests._tiny import tiny_model, tiny_records, tiny_tokenizer

SEED = 0


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


def test_every_nlft_config_field_is_a_flag(tmp_path):
    """Each field, set alone through its generated flag, reaches NLFTConfig; the others keep defaults."""
    parser = build_parser()
    for f in fields(NLFTConfig):
        assert f.default is not MISSING and f.metadata.get("help"), f"{f.name} needs a default and help"
        value = _other_value(f)
        flag = f"--{f.name.replace('_', '-')}"
        for command in (["train", "--data", __file__, "--out", str(tmp_path)], ["demo"]):
            config = nlft_config_from_args(parser.parse_args([*command, flag, str(value)]))
            assert getattr(config, f.name) == value, (f.name, command)
            assert config == NLFTConfig(**{f.name: value})


def test_every_training_setting_is_a_flag():
    """Each training flag (every field NLFTTrainingArguments adds, and the TrainingArguments
    fields `nlft train` exposes), set alone through its generated flag, reaches the arguments."""
    parser = build_parser()
    flag_fields = train_flag_fields()
    base = ["train", "--data", __file__, "--out", "x"]
    cases = {
        "steps": (["--steps", "7"], 7),
        "epochs": (["--epochs", "2.5"], 2.5),
        "batch_size": (["--batch-size", "3"], 3),
        "grad_accum": (["--grad-accum", "4"], 4),
        "lr": (["--lr", "3e-5"], 3e-5),
        "lr_scheduler": (["--lr-scheduler", "cosine"], "cosine"),
        "warmup_ratio": (["--warmup-ratio", "0.1"], 0.1),
        "gradient_checkpointing": (["--gradient-checkpointing"], True),
        "seed": (["--seed", "5"], 5),
        "lora": (["--full"], False),
        "lora_r": (["--lora-r", "4"], 4),
        "lora_alpha": (["--lora-alpha", "32"], 32.0),
        "lora_dropout": (["--lora-dropout", "0.1"], 0.1),
        "lora_targets": (["--lora-targets", "q_proj,v_proj"], ["q_proj", "v_proj"]),
        "max_length": (["--max-length", "64"], 64),
        "judge_nll_weight": (["--judge-nll-weight", "10"], 10.0),
    }
    assert set(cases) == set(flag_fields)  # no --output-dir: --out, the CLI saves (merged) itself
    added = {f.name for f in fields(NLFTTrainingArguments)} - {f.name for f in fields(TrainingArguments)}
    assert added <= {flag_fields[k] for k in cases}, "a field NLFTTrainingArguments adds has no flag"
    default = training_arguments_from_args(parser.parse_args(base))
    for keyword, (argv, expected) in cases.items():
        name = flag_fields[keyword]
        got = training_arguments_from_args(parser.parse_args(base + argv))
        assert getattr(got, name) == expected and getattr(default, name) != expected, keyword
    assert isinstance(default, NLFTTrainingArguments) and default.max_steps == 20
    with pytest.raises(SystemExit):
        main(base + ["--lora-targets", ","])


def test_bad_config_value_names_the_field(records_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data", str(records_file), "--out", str(tmp_path / "m"), "--correct-threshold", "1.5"])
    assert "NLFTConfig.correct_threshold must be in (0, 1)" in capsys.readouterr().err


def test_training_flags_parse():
    args = build_parser().parse_args(
        ["train", "--data", __file__, "--out", "x", "--dtype", "bf16", "--lora-r", "8", "--lora-alpha", "32",
         "--lora-dropout", "0.1", "--lora-targets", "q_proj, v_proj", "--gradient-checkpointing", "--epochs", "3",
         "--lr-scheduler", "cosine", "--warmup-ratio", "0.1", "--judge-nll-weight", "10", "--load-in-8bit"]
    )  # fmt: skip
    assert (args.dtype, args.lora_r, args.lora_alpha, args.lora_dropout) == ("bf16", 8, 32.0, 0.1)
    assert args.lora_targets == ["q_proj", "v_proj"] and args.gradient_checkpointing and args.load_in_8bit
    assert (args.epochs, args.lr_scheduler, args.warmup_ratio, args.judge_nll_weight) == (3.0, "cosine", 0.1, 10.0)
    defaults = build_parser().parse_args(["train", "--data", __file__, "--out", "x"])
    assert (defaults.lora_r, defaults.lora_alpha, defaults.lora_dropout, defaults.lora_targets) == (16, 16, 0.05, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", __file__, "--out", "x", "--steps", "2", "--epochs", "1"])


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


def test_cli_train_dtype_and_targets(model_dir, records_file, tmp_path, capsys):
    out = tmp_path / "trained"
    main(["train", "--model", str(model_dir), "--data", str(records_file), "--steps", "1", "--dtype", "bf16",
          "--lora-targets", "q_proj,v_proj", "--lora-r", "4", "--out", str(out)])  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", str(model_dir), "--data", str(records_file), "--steps", "1",
              "--lora-targets", "no_such_proj", "--out", str(tmp_path / "x")])  # fmt: skip
    assert "LoRA targets ['no_such_proj'] are not modules" in str(info.value.code)


def test_train_lets_other_warnings_show(model_dir, records_file, tmp_path, monkeypatch):
    """`nlft train` rewords only encode_records' counts; a warning from anything else in training
    (here a library's FutureWarning, raised around the real train) still reaches the user."""
    import nlft_kernels.training as training

    real_train = training.train

    def train_with_a_library_warning(*args, **kwargs):
        warnings.warn("some_library: `foo` is deprecated, use `bar`", FutureWarning, stacklevel=2)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train", train_with_a_library_warning)
    with pytest.warns(FutureWarning, match="`foo` is deprecated"):
        main(["train", "--model", str(model_dir), "--data", str(records_file), "--steps", "1",
              "--out", str(tmp_path / "m")])  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_load_in_8bit_without_cuda_is_a_clear_error(model_dir, records_file, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", str(model_dir), "--data", str(records_file), "--load-in-8bit", "--out",
              str(tmp_path / "m")])  # fmt: skip
    assert "need a CUDA GPU" in str(info.value.code)


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


def test_load_in_8bit_trains_lora_only(records_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data", str(records_file), "--load-in-8bit", "--full", "--out", str(tmp_path / "m")])
    assert "--load-in-8bit trains through LoRA only" in capsys.readouterr().err


# ------------------------------------------------------------------------------ bad input


def test_long_responses_are_truncated_with_a_count(model_dir, records_file, tmp_path, capsys):
    tokenizer = tiny_tokenizer()
    records = tiny_records()
    prompts = [max(e[f"{v}_prompt_length"] for v in ("base", "standard", "judge"))
               for e in (encode_record(r, tokenizer) for r in records)]  # fmt: skip
    max_length = max(prompts) + 3
    lengths = [len(response_ids(r.response, tokenizer)) for r in records]
    expected = sum(n > max_length - p for n, p in zip(lengths, prompts, strict=True))
    assert 0 < expected < len(records), "the cut must hit some records and spare others"
    before = records_file.read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["train", "--model", str(model_dir), "--data", str(records_file), "--steps", "1",
              "--max-length", str(max_length), "--out", str(tmp_path / "m")])  # fmt: skip
    assert not any("truncated" in str(w.message) for w in caught)  # printed as a line, not also a warning
    err = capsys.readouterr().err
    assert f"{expected} of {len(records)} responses truncated to fit max_length={max_length}" in err
    assert records_file.read_bytes() == before  # the input is only read


def test_malformed_jsonl_line_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "responses.jsonl"
    good = json.dumps({"question": "q", "response": "r", "answer": "#### 1"})
    path.write_text(f"{good}\n\n{{not json\n{good}\n")
    with pytest.raises(SystemExit):
        main(["judge", "--in", str(path), "--out", str(tmp_path / "out.jsonl")])
    assert f"{path}, line 3: not valid JSON" in capsys.readouterr().err


def test_record_missing_a_field_names_it(model_dir, tmp_path, capsys):
    rows = [{"question": "q", "response": "r", "answer": "a", "correct": True},
            {"question": "q", "answer": "a", "correct": True}]  # fmt: skip
    path = write_jsonl(tmp_path / "records.jsonl", rows)
    train = ["train", "--model", str(model_dir), "--data", str(path), "--steps", "1", "--out", str(tmp_path / "m")]
    assert f"{path}, line 2: missing field 'response' or 'output'" in cli_error(capsys, train)
    responses = write_jsonl(tmp_path / "responses.jsonl", [{"question": "q", "response": "r"}])
    judge = ["judge", "--in", str(responses), "--out", str(tmp_path / "out.jsonl")]
    assert "line 1: missing field answer" in cli_error(capsys, judge)


def test_judge_input_lines_are_the_files_lines(tmp_path, capsys):
    """Blank lines count: a bad row and each output row name the line an editor shows, not the row's rank."""
    good = json.dumps({"question": "q", "response": "The answer is 1.", "answer": "#### 1"})
    bad = json.dumps({"question": "q", "response": "r"})
    path = tmp_path / "responses.jsonl"
    path.write_text(f"\n{good}\n\n\n{bad}\n")  # the bad row is the 2nd row, on line 5
    with pytest.raises(SystemExit):
        main(["judge", "--in", str(path), "--out", str(tmp_path / "out.jsonl")])
    assert f"--in {path}, line 5: missing field answer" in capsys.readouterr().err
    path.write_text(f"\n{good}\n\n\n{good}\n")
    assert main(["judge", "--in", str(path), "--out", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [2, 5] and all(r["correct"] for r in rows)


def test_generate_never_writes_over_its_input(tmp_path, capsys):
    data = tmp_path / "questions.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    before = data.read_bytes()
    with pytest.raises(SystemExit):
        main(["generate", "--data", str(data), "--out", str(data)])
    assert "inputs are never rewritten" in capsys.readouterr().err and data.read_bytes() == before


def test_generate_never_writes_over_a_folders_split(tmp_path, capsys):
    """--data a folder: its {split}.jsonl is the input, protected as a file given by name is."""
    data = tmp_path / "gsm8k" / "train.jsonl"
    data.parent.mkdir()
    data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    before = data.read_bytes()
    with pytest.raises(SystemExit):
        main(["generate", "--data", str(data.parent), "--out", str(data)])
    assert "inputs are never rewritten" in capsys.readouterr().err and data.read_bytes() == before
