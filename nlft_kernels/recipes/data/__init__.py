"""Data shipped inside the package, so that the commands run with no network and no checkout.

GSM8K (Cobbe et al. 2021, MIT licence, ``gsm8k/LICENSE`` beside the files): the 7,473 train and
1,319 test problems of ``openai/gsm8k`` (config ``main``), one JSON object per line with
``question`` and ``answer``, xz-compressed (``gsm8k/{train,test}.jsonl.xz``, about 1.2 MB in all).
"""

from __future__ import annotations

from pathlib import Path

GSM8K_DIR = Path(__file__).resolve().parent / "gsm8k"
GSM8K_SPLITS = ("train", "test")


def gsm8k_file(split: str) -> Path:
    """The embedded GSM8K file of ``split`` (``train`` or ``test``)."""
    if split not in GSM8K_SPLITS:
        raise ValueError(f"the embedded GSM8K has the splits {GSM8K_SPLITS}, not {split!r}")
    path = GSM8K_DIR / f"{split}.jsonl.xz"
    if not path.is_file():  # a broken install (package data left out): say so, not "no such file"
        raise FileNotFoundError(f"the embedded GSM8K file {path} is missing: reinstall nlft-kernels")
    return path


def read_gsm8k(split: str = "train", limit: int | None = None) -> list[dict]:
    """The embedded GSM8K rows (``question``, ``answer``) of ``split``, at most ``limit``."""
    from nlft_kernels.training.data import read_jsonl

    return read_jsonl(gsm8k_file(split), limit)
