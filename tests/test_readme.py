"""The Python examples of README.md and docs/ run as written (on a tiny random Llama where they need a model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from nlft_kernels.training import NLFTCollator, encode_records, save_records
from tests._tiny import tiny_model, tiny_records, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_block(heading: str, index: int = 0, page: Path = README) -> str:
    """The ``index``-th ```python block of the section of ``page`` that starts with ``heading``
    (up to the next heading of the same level)."""
    text = page.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n") if f"\n{heading}\n" in text else text.index(f"{heading}\n")
    level = heading.split(" ", 1)[0]
    end = text.find(f"\n{level} ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)
    assert len(blocks) > index, f"no python block {index} under {heading!r}"
    return blocks[index]


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


def test_api_in_ten_lines():
    namespace: dict = {}
    exec(python_block("## The API in ten lines"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["base_logits"].grad.abs().sum() > 0


def test_linear_loss_in_a_training_loop(tokenizer):
    model = tiny_model(len(tokenizer))
    batch = NLFTCollator(tokenizer.pad_token_id)(encode_records(tiny_records(), tokenizer))
    assert batch["correct"].any() and not batch["correct"].all()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.lm_head.weight.detach().clone()
    namespace = {"model": model, "loader": [batch], "optimizer": optimizer}
    exec(python_block("## Never materialise the logits: `nlft_linear_loss`", 1, ROOT / "docs" / "api.md"), namespace)
    assert torch.isfinite(namespace["loss"])
    assert not torch.equal(model.lm_head.weight, before)  # the head trained through the fused loss


def test_train_on_your_data(tokenizer, tmp_path, monkeypatch):
    """The training example, with 2 steps instead of 100 to keep the suite fast."""
    monkeypatch.chdir(tmp_path)
    save_records("data.jsonl", tiny_records())
    code = python_block("# Train with NLFT on your data", page=ROOT / "docs" / "training.md")
    assert "steps=100" in code
    namespace = {"model": tiny_model(len(tokenizer)), "tokenizer": tokenizer}
    exec(code.replace("steps=100", "steps=2"), namespace)
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_layout_names_every_module():
    """README's Layout names each module and subpackage of nlft_kernels/ and nlft_kernels/recipes/
    (the two levels it describes), so that a new file cannot leave it behind."""
    text = README.read_text(encoding="utf-8")
    layout = text[text.index("## Layout") :]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    for folder in (ROOT / "nlft_kernels", ROOT / "nlft_kernels" / "recipes"):
        names = [p.name for p in folder.glob("*.py") if p.name != "__init__.py"]
        names += [f"{p.name}/" for p in folder.iterdir() if (p / "__init__.py").exists() or p.name == "data"]
        missing = [n for n in names if not re.search(rf"(?<![\w/]){re.escape(n)}", layout)]
        assert not missing, f"README's Layout does not name {missing} of {folder.relative_to(ROOT)}"
