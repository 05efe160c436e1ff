"""The ``nlft`` command line: argument parsing, errors, and every subcommand end to end on a tiny
random Llama model saved to a temporary folder (no network, a few seconds each)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nlft_kernels.recipes import cli
from nlft_kernels.recipes.cli import build_parser, main
from tests._cli import cli_error, write_jsonl
from tests._tiny import save_tiny_model

ROWS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "She sold 48/2 = <<48/2=24>>24 in May.\n48+24 = <<48+24=72>>72 in all.\n#### 72"},
    {"question": "Weng earns $12 an hour. She did 50 minutes of babysitting. How much did she earn?",
     "answer": "12/60 = $<<12/60=0.2>>0.2 per minute.\n0.2 * 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty has half of the $100 she needs. Her parents give $15 and her grandparents twice that. "
                 "How much more does she need?",
     "answer": "She has 100 / 2 = $<<100/2=50>>50.\nGrandparents: 15 * 2 = $<<15*2=30>>30.\n"
               "100 - 50 - 30 - 15 = <<100-50-30-15=5>>5\n#### 5"},
]  # fmt: skip
FAST = ["--max-new-tokens", "4", "--batch-size", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return folder


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------- parsing


def test_parser_defaults():
    args = build_parser().parse_args(["demo"])
    assert (args.samples, args.steps, args.lora, args.model, args.out) == (8, 4, True, None, Path("nlft-demo"))
    assert args.max_new_tokens == cli.DEMO_MAX_NEW_TOKENS
    args = build_parser().parse_args(["train", "--data", __file__, "--out", "x", "--full", "--lr", "3e-5"])
    assert (args.lora, args.lr, args.batch_size) == (False, 3e-5, 2)
    args = build_parser().parse_args(["eval", "--samples", "5", "--seed", "3"])
    assert (args.samples, args.seed, args.split, args.out) == (5, 3, "test", None)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: COMMAND"),
        (["fly"], "invalid choice"),
        (["demo", "--samples", "0"], "must be >= 1"),
        (["demo", "--samples", "two"], "expected a whole number"),
        (["eval", "--seed", "-1"], "must be >= 0"),
        (["train", "--data", __file__, "--out", "x", "--lr", "0"], "positive finite"),
        (["train", "--data", __file__, "--out", "x", "--lora", "--full"], "not allowed with argument"),
        (["train", "--out", "x"], "required: --data"),
        (["judge", "--in", "/no/such/file.jsonl", "--out", "x"], "no such file"),
        (["generate", "--data", "/no/such/file.jsonl", "--out", "x"], "no such file"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_data_folder_without_split(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(SystemExit):
        main(["eval", "--data", str(tmp_path), "--model", "unused"])
    assert "has no test.jsonl" in capsys.readouterr().err


def test_data_without_fields(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"problem": "1 + 1?"}) + "\n")
    with pytest.raises(SystemExit):
        main(["eval", "--data", str(path)])
    assert "lacks the fields 'question' and 'answer'" in capsys.readouterr().err


def test_default_data_is_the_embedded_gsm8k(monkeypatch, tmp_path):
    """No --data: GSM8K from inside the package, whatever the current folder and with the hub off."""
    from nlft_kernels.recipes.data import GSM8K_DIR

    monkeypatch.chdir(tmp_path)  # no ../shared next to it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    for split, count in (("train", 7473), ("test", 1319)):
        source = Path(cli.resolve_data(None, split, parser))
        assert source.parent == GSM8K_DIR and source.name == f"{split}.jsonl.xz"
        rows = cli.read_data(None, split, parser)
        assert len(rows) == count and all(set(r) == {"question", "answer"} for r in rows)
        assert all("####" in r["answer"] for r in rows)
    assert (GSM8K_DIR / "LICENSE").read_text().startswith("MIT License")
    assert "nlft_kernels/recipes/data" in str(GSM8K_DIR).replace("\\", "/") and "shared" not in GSM8K_DIR.parts


def test_embedded_split_must_exist(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--split", "validation", "--samples", "1"])
    assert "the embedded GSM8K has the splits train, test" in capsys.readouterr().err


@pytest.mark.parametrize("compression", ["", ".gz", ".xz"])
def test_data_file_plain_or_compressed(tmp_path, compression):
    import gzip
    import lzma

    path = tmp_path / f"rows.jsonl{compression}"
    text = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    path.write_bytes({"": bytes, ".gz": gzip.compress, ".xz": lzma.compress}[compression](text))
    assert cli.read_data(str(path), "train", build_parser()) == ROWS
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / f"test.jsonl{compression}").write_bytes(path.read_bytes())
    assert cli.read_data(str(tmp_path / "folder"), "test", build_parser()) == ROWS


def test_hub_name_goes_to_datasets(monkeypatch, capsys):
    """A hub name is read with datasets.load_dataset (here made offline): a clean error naming it."""
    import datasets

    asked = []

    def offline(*args, **kwargs):
        asked.append((args, kwargs))
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit):
        main(["eval", "--samples", "1", "--data", "openai/gsm8k:main"])
    assert "--data openai/gsm8k:main: no network" in capsys.readouterr().err
    assert asked == [(("openai/gsm8k", "main"), {"split": "test"})]


def test_unloadable_model(tmp_path, data_dir):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--data", str(data_dir), "--model", str(tmp_path / "no-model"), "--samples", "1"])
    assert "cannot load model" in str(exit_info.value.code)


def test_bad_judge_hook(tmp_path, capsys):
    path = tmp_path / "responses.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1", "response": "1"}) + "\n")
    with pytest.raises(SystemExit):
        main(["judge", "--in", str(path), "--out", str(tmp_path / "r.jsonl"), "--judge", "nope"])
    assert "--judge" in capsys.readouterr().err


def test_judge_input_without_responses(tmp_path, capsys):
    path = write_jsonl(tmp_path / "responses.jsonl", [{"question": "q", "answer": "#### 1"}])
    assert "missing field response" in cli_error(
        capsys, ["judge", "--in", str(path), "--out", str(tmp_path / "r.jsonl")]
    )


# ------------------------------------------------------------------------------ end to end


def test_generate_judge_train_eval(model_dir, data_dir, tmp_path, capsys):
    responses, records, trained = tmp_path / "responses.jsonl", tmp_path / "records.jsonl", tmp_path / "trained"
    main(["generate", "--model", str(model_dir), "--data", str(data_dir), "--samples", "2", "--out", str(responses)]
         + FAST)  # fmt: skip
    generated = read_jsonl(responses)
    assert len(generated) == 2 and all(set(r) >= {"question", "answer", "response", "instruction"} for r in generated)
    assert {r["question"] for r in generated} <= {r["question"] for r in ROWS}

    main(["judge", "--in", str(responses), "--out", str(records)])
    judged = read_jsonl(records)
    assert len(judged) == 2 and all(isinstance(r["correct"], bool) for r in judged)
    # A random model does not solve the problems: every record is wrong and carries a judgment.
    assert all(not r["correct"] and "The correct answer is" in r["judgment"] for r in judged)

    main(["train", "--model", str(model_dir), "--data", str(records), "--steps", "2", "--out", str(trained)])
    assert (trained / "config.json").is_file() and not (trained / "adapter_config.json").exists()

    result_path = tmp_path / "eval.json"
    main(["eval", "--model", str(trained), "--data", str(data_dir), "--samples", "3", "--out", str(result_path)]
         + FAST)  # fmt: skip
    result = json.loads(result_path.read_text())
    assert result["count"] == 3 and len(result["samples"]) == 3
    assert "accuracy: 0.00% (0/3)" in capsys.readouterr().out.splitlines()[-1]


def test_judge_with_user_hook(tmp_path):
    hook = tmp_path / "my_judge.py"
    hook.write_text("def judge(question, response, reference):\n    return (len(response) > 3, 'Too short.')\n")
    rows = [{"question": "q", "answer": "#### 7", "response": r} for r in ("seven", "7")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(
        ["judge", "--in", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"), "--judge", f"{hook}:judge"]
    )
    judged = read_jsonl(tmp_path / "out.jsonl")
    assert [(r["correct"], r["judgment"]) for r in judged] == [(True, None), (False, "Too short.")]


def test_demo(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--model", str(model_dir), "--data", str(data_dir), "--samples", "2", "--steps", "1",
          "--out", str(out)] + FAST)  # fmt: skip
    for name in ("eval_before.json", "responses.jsonl", "records.jsonl", "eval_after.json", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 2 and summary["train_records"] == 2 and summary["steps"] == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("GSM8K accuracy on 2 test questions: before 0.00% -> after 0.00%")


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "nlft_kernels", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout and "generate" in done.stdout


@pytest.mark.slow
def test_demo_on_smollm2(tmp_path, capsys):
    pytest.importorskip("gguf")
    from nlft_kernels.recipes.models import smollm2_gguf

    try:
        smollm2_gguf()
    except RuntimeError as err:
        pytest.skip(str(err))
    main(["demo", "--samples", "2", "--steps", "1", "--max-new-tokens", "48", "--out", str(tmp_path / "demo")])
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["count"] == 2 and summary["train_records"] == 2
    assert "GSM8K accuracy on 2 test questions" in capsys.readouterr().out
