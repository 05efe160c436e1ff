"""The ``nlft`` command line: parsing (in process), and every subcommand as a real process
(``python -m nlft_kernels``: exit status, stdout, stderr, files) on a tiny random Llama saved to a
temporary folder (no network)."""

import json
import re
from pathlib import Path

import pytest

from nlft_kernels.recipes import questions
from nlft_kernels.recipes.cli import build_parser, parse_args
from nlft_kernels.recipes.errors import BadInput
from tests._cli import bad_input, nlft_error, nlft_ok, run_nlft, write_jsonl
from tests._tiny import require_embedded_smollm2, save_tiny_model

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
# What a successful training run prints on stderr besides progress bars: none of it.
TRAIN_INFO = ()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "test"):
        write_jsonl(folder / f"{split}.jsonl", ROWS)
    return folder


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------- parsing


def test_parser_defaults():
    from nlft_kernels.recipes.commands.settings import build
    from nlft_kernels.recipes.demo import DemoSettings

    args = build_parser().parse_args(["demo"])
    assert (args.model, args.out) == (None, Path("nlft-demo"))
    settings = build(DemoSettings, args)
    assert settings == DemoSettings() and settings.task == "add2" and settings.response_source == "sibling"
    args = build_parser().parse_args(["train", "--data", __file__, "--out", "x", "--full", "--lr", "3e-5"])
    assert (args.lora, args.learning_rate, args.per_device_train_batch_size) == (False, 3e-5, 2)
    args = build_parser().parse_args(["eval", "--samples", "5", "--seed", "3"])
    assert (args.samples, args.seed, args.split, args.out, args.task) == (5, 3, "test", None, "gsm8k")


def test_bad_flags_are_bad_input():
    """Parse errors are BadInput (one line, exit 2 from main), not argparse's usage block and exit."""
    with pytest.raises(BadInput, match=r"invalid float value: 'x' \(`nlft train --help` lists the flags\)"):
        parse_args(["train", "--data", __file__, "--out", "x", "--lr", "x"])
    with pytest.raises(BadInput, match="unrecognized arguments: --lerning-rate"):
        parse_args(["train", "--data", __file__, "--out", "x", "--lerning-rate", "1"])


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: COMMAND"),
        (["fly"], "invalid choice"),
        (["demo", "--train-size", "0"], "train_size must be a whole number >= 1"),
        (["demo", "--steps", "two"], "invalid int value: 'two'"),
        (["demo", "--task", "add4"], "argument --task: invalid choice: 'add4'"),
        (["demo", "--task", "gsm8k", "--source", "sibling"], "task gsm8k has no sibling solver"),
        (["demo", "--lr", "nan"], "lr must be a positive finite number"),
        (["eval", "--task", "add2", "--data", __file__], "--task add2 generates its own"),
        (["eval", "--task", "add2", "--split", "dev"], "--split dev: a task's splits are train, validation, test"),
        (["generate", "--task", "mul21", "--samples", "5000", "--out", "x"], "mul21: asked for 5000 train"),
        (["eval", "--seed", "-1"], "seed must be a whole number >= 0"),
        (["train", "--data", __file__, "--out", "x", "--lr", "0"], "learning_rate (--lr) must be a positive finite"),
        (["train", "--data", __file__, "--out", "x", "--steps", "2", "--epochs", "1"], "--steps and --epochs"),
        (["train", "--out", "x"], "required: --data"),
        (["judge", "--in", "/no/such/file.jsonl", "--out", "x"], "--in: no such file"),
        (["generate", "--data", "/no/such/file.jsonl", "--out", "x"], "--data: no such file"),
        (["generate", "--out", "x", "--temperature", "nan"], "temperature must be a positive finite number"),
        (["train", "--data", __file__, "--out", "x", "--lora-targets", ","], "lora_targets must name at least one"),
        (["train", "--data", __file__, "--out", "x", "--correct-threshold", "1.5"], "correct_threshold must be in (0"),
        (["saliency", "--data", __file__, "--out", "x", "--max-records", "0"], "--max-records must be >= 1"),
        (["judge", "--in", __file__, "--out", "x", "--concurrency", "0"], "--concurrency must be >= 1"),
    ],
)
def test_bad_arguments(argv, message):
    """Bad flags: BadInput naming what is wrong (before any model loads)."""
    assert message in bad_input(*argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "nlft: error: the following arguments are required: COMMAND"),
        (["train", "--data", __file__, "--out", "x", "--lr", "x"], "nlft train: error: argument --learning_rate"),
        (["generate", "--out", "x", "--temperature", "nan"], "nlft generate: error: temperature must be a positive"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message):
    """The process: exit status 2 and one line on stderr (no usage block, no traceback)."""
    assert nlft_error(*argv).startswith(message)


def test_data_folder_without_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:1])
    assert "has no test.jsonl" in bad_input("eval", "--data", tmp_path, "--model", "unused")


def test_data_without_fields(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"problem": "1 + 1?"}])
    assert f"--data {path}, line 1: missing field 'question'" in bad_input("eval", "--data", path)


def test_default_data_is_the_embedded_gsm8k(monkeypatch, tmp_path):
    """No --data: GSM8K from inside the package, whatever the current folder and with the hub off."""
    from nlft_kernels.recipes.data import GSM8K_DIR

    monkeypatch.chdir(tmp_path)  # no ../shared next to it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for split, count in (("train", 7473), ("test", 1319)):
        source = Path(questions.resolve_data(None, split))
        assert source.parent == GSM8K_DIR and source.name == f"{split}.jsonl.xz"
        rows = questions.read_data(None, split)
        assert len(rows) == count and all(set(r) == {"question", "answer"} for r in rows)
        assert all("####" in r["answer"] for r in rows)
    assert (GSM8K_DIR / "LICENSE").read_text().startswith("MIT License")
    assert "nlft_kernels/recipes/data" in str(GSM8K_DIR).replace("\\", "/") and "shared" not in GSM8K_DIR.parts


def test_embedded_split_must_exist():
    assert "the embedded GSM8K has the splits train, test" in bad_input("eval", "--split", "validation")


@pytest.mark.parametrize("compression", ["", ".gz", ".xz"])
def test_data_file_plain_or_compressed(tmp_path, compression):
    import gzip
    import lzma

    path = tmp_path / f"rows.jsonl{compression}"
    text = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    path.write_bytes({"": bytes, ".gz": gzip.compress, ".xz": lzma.compress}[compression](text))
    assert questions.read_data(str(path), "train") == ROWS
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / f"test.jsonl{compression}").write_bytes(path.read_bytes())
    assert questions.read_data(str(tmp_path / "folder"), "test") == ROWS


def test_hub_name_goes_to_datasets(monkeypatch):
    """A hub name is read with datasets.load_dataset (here made offline): BadInput naming it."""
    import datasets

    asked = []

    def offline(*args, **kwargs):
        asked.append((args, kwargs))
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BadInput, match="--data openai/gsm8k:main: no network"):
        questions.read_questions("openai/gsm8k:main", "test")
    assert asked == [(("openai/gsm8k", "main"), {"split": "test"})]


def test_unloadable_model(tmp_path, data_dir):
    line = bad_input("eval", "--data", data_dir, "--model", tmp_path / "no-model", "--samples", "1")
    assert "--model: cannot load model" in line


def test_bad_judge_hook(tmp_path):
    path = write_jsonl(tmp_path / "responses.jsonl", [{"question": "q", "answer": "#### 1", "response": "1"}])
    assert "--judge" in bad_input("judge", "--in", path, "--out", tmp_path / "r.jsonl", "--judge", "nope")


def test_judge_input_without_responses(tmp_path):
    path = write_jsonl(tmp_path / "responses.jsonl", [{"question": "q", "answer": "#### 1"}])
    assert "line 1: missing field response" in bad_input("judge", "--in", path, "--out", tmp_path / "r.jsonl")


# ------------------------------------------------------------------------------ end to end


def test_generate_judge_train_eval(model_dir, data_dir, tmp_path):
    """Each step a process that exits 0 with nothing on stderr but its progress bars."""
    responses, records, trained = tmp_path / "responses.jsonl", tmp_path / "records.jsonl", tmp_path / "trained"
    nlft_ok("generate", "--model", model_dir, "--data", data_dir, "--samples", "2", "--out", responses, *FAST)
    generated = read_jsonl(responses)
    assert len(generated) == 2 and all(set(r) >= {"question", "answer", "response", "instruction"} for r in generated)
    assert {r["question"] for r in generated} <= {r["question"] for r in ROWS}

    nlft_ok("judge", "--in", responses, "--out", records)
    judged = read_jsonl(records)
    assert len(judged) == 2 and all(isinstance(r["correct"], bool) for r in judged)
    # A random model does not solve the problems: every record is wrong and carries a judgment.
    assert all(not r["correct"] and "The correct answer is" in r["judgment"] for r in judged)

    nlft_ok("train", "--model", model_dir, "--data", records, "--steps", "2", "--out", trained)
    assert (trained / "config.json").is_file() and not (trained / "adapter_config.json").exists()

    result_path = tmp_path / "eval.json"
    done = nlft_ok("eval", "--model", trained, "--data", data_dir, "--samples", "3", "--out", result_path, *FAST)
    result = json.loads(result_path.read_text())
    assert result["count"] == 3 and len(result["samples"]) == 3
    assert "accuracy: 0.00% (0/3)" in done.stdout.splitlines()[-1]


def test_judge_with_user_hook(tmp_path):
    hook = tmp_path / "my_judge.py"
    hook.write_text("def judge(question, response, reference):\n    return (len(response) > 3, 'Too short.')\n")
    rows = [{"question": "q", "answer": "#### 7", "response": r} for r in ("seven", "7")]
    write_jsonl(tmp_path / "in.jsonl", rows)
    nlft_ok("judge", "--in", tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl", "--judge", f"{hook}:judge")
    judged = read_jsonl(tmp_path / "out.jsonl")
    assert [(r["correct"], r["judgment"]) for r in judged] == [(True, None), (False, "Too short.")]


def test_demo(model_dir, tmp_path):
    """`nlft demo` as a process on the default task (add2) at the smallest settings: exit 0, the
    before -> after line with both intervals last on stdout, the saliency map of the records it
    trained on and summary.json in --out."""
    out = tmp_path / "demo"
    done = nlft_ok("demo", "--model", model_dir, "--train-size", "4", "--test-size", "3", "--steps", "1",
                   "--batch-size", "2", "--generation-batch", "3", "--max-new-tokens", "4", "--out", out)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["task"] == "add2" and summary["settings"]["source"] == "sibling"
    assert summary["before"]["count"] == summary["after"]["count"] == 3 and summary["records"] == 4
    assert summary["command"].startswith("nlft demo --model ")
    assert summary["device"] and summary["torch_threads"] >= 1 and summary["seconds"] > 0
    last = done.stdout.strip().splitlines()[-1]
    assert last == summary["summary"]
    assert re.match(r"add2 accuracy on 3 test questions: before \S+% \(95% CI \S+\) -> after \S+% \(95% CI", last)
    trained_on = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    mapped = [json.loads(line) for line in (out / "saliency.jsonl").read_text().splitlines()]
    assert len(trained_on) == len(mapped) == 4 and (out / "saliency.html").is_file()
    assert [m["response"] for m in mapped] == [r["response"] for r in trained_on]
    assert (
        f"saliency map of these records (the weights NLFT gives their tokens): {out / 'saliency.html'}" in done.stdout
    )


def test_generate_and_eval_on_a_task(model_dir, tmp_path):
    """--task: generate and eval on questions generated by code (the task's prompt with its worked
    examples, its reference solution, its judge), as processes."""
    from nlft_kernels.recipes.tasks import get_task

    responses, result_path = tmp_path / "responses.jsonl", tmp_path / "eval.json"
    nlft_ok("generate", "--model", model_dir, "--task", "add2", "--samples", "3", "--seed", "1", "--out", responses,
            *FAST)  # fmt: skip
    rows = read_jsonl(responses)
    task = get_task("add2")
    problems = task.problems("train", 3, seed=1)
    assert sorted(r["question"] for r in rows) == sorted(task.prompt(p) for p in problems)
    assert sorted(r["answer"] for r in rows) == sorted(p.solution for p in problems)
    assert all(r["generation"]["task"] == "add2" and r["instruction"] == task.instruction for r in rows)
    assert all(r["response"] == task.read(r["response"]) for r in rows)  # written as the task reads it

    done = nlft_ok("eval", "--model", model_dir, "--task", "add2", "--samples", "3", "--out", result_path, *FAST)
    result = json.loads(result_path.read_text())
    test = task.problems("test", 3, seed=0)
    assert result["task"] == "add2" and result["count"] == 3
    assert [s["question"] for s in result["samples"]] == [p.question for p in test]
    assert all(
        s["correct"] == task.judge(p, s["response"]).correct for s, p in zip(result["samples"], test, strict=True)
    )
    low, high = result["ci95"]
    assert 0 <= low <= result["accuracy"] <= high <= 1
    assert done.stdout.splitlines()[-1].startswith(f"accuracy: {100 * result['accuracy']:.2f}% (")
    assert "95% CI" in done.stdout.splitlines()[-1]


def test_python_dash_m_entry_point():
    done = run_nlft("--help")
    assert done.returncode == 0 and "demo" in done.stdout and "generate" in done.stdout


def test_version():
    """`nlft --version` (a process): the installed versions on one line, exit status 0."""
    import importlib.metadata

    import nlft_kernels

    done = run_nlft("--version")
    assert done.returncode == 0, done.stderr
    torch_version, triton_version = (importlib.metadata.version(n) for n in ("torch", "triton"))
    assert done.stdout == f"nlft-kernels {nlft_kernels.__version__} (torch {torch_version}, triton {triton_version})\n"


@pytest.mark.slow
def test_demo_on_smollm2(tmp_path):
    require_embedded_smollm2()
    done = nlft_ok("demo", "--train-size", "4", "--test-size", "4", "--steps", "1", "--out", tmp_path / "demo")
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["after"]["count"] == 4 and summary["records"] == 4
    assert "add2 accuracy on 4 test questions: before" in done.stdout
