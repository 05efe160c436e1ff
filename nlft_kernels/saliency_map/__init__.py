"""The NLFT saliency map: what NLFT does to each token of a judged response.

Application code on top of the loss (the kernel core never imports it); transformers, tqdm and
matplotlib are imported only by the functions that need them.

- :func:`saliency_details`: per record, per response token: its text, p_b, p_s, p_j, weight,
  loss and marks (saliency, unlikelihood, cluster, killed), for notebooks;
- :func:`saliency_html`: the self-contained HTML page of those details;
- :func:`saliency_png`: the first records as a PNG (matplotlib);
- :func:`write_saliency_map`: ``saliency.html``, ``saliency.png`` and ``saliency.jsonl`` in a folder
  (what ``nlft saliency`` and ``nlft demo`` write).

In a notebook::

    from nlft_kernels.recipes.models import load_model
    from nlft_kernels.saliency_map import saliency_details
    from nlft_kernels.training import load_records

    model, tokenizer = load_model()                       # the embedded SmolLM2-135M-Instruct
    records = saliency_details(model, tokenizer, load_records("records.jsonl")[:4])
    [(t.text, t.p_base, t.weight, t.marks) for t in records[0].tokens]
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from nlft_kernels.config import NLFTConfig
from nlft_kernels.saliency_map.details import (
    MARKS,
    RecordSaliency,
    TokenSaliency,
    batch_details,
    saliency_details,
    token_pieces,
)
from nlft_kernels.saliency_map.figure import saliency_png
from nlft_kernels.saliency_map.page import hover_text, saliency_html, weight_colour

__all__ = [
    "MARKS",
    "RecordSaliency",
    "TokenSaliency",
    "batch_details",
    "hover_text",
    "saliency_details",
    "saliency_html",
    "saliency_png",
    "token_pieces",
    "weight_colour",
    "write_saliency_map",
    "NO_PNG",
]

# What a command says when write_saliency_map wrote no PNG because matplotlib is missing.
NO_PNG = "no saliency.png: it needs matplotlib (pip install matplotlib)"


def write_saliency_map(
    records: Sequence[RecordSaliency],
    out: str | os.PathLike,
    *,
    subtitle: str | None = None,
    png_records: int = 3,
    config: NLFTConfig = NLFTConfig(),
) -> dict[str, Path]:
    """Write ``out/saliency.html`` (every record), ``out/saliency.jsonl`` (the details, one record
    a line) and, when matplotlib is installed, ``out/saliency.png`` (the first ``png_records``
    records; 0: none). Returns the paths written, by kind (``html``, ``jsonl``, ``png``)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"html": folder / "saliency.html", "jsonl": folder / "saliency.jsonl"}
    paths["html"].write_text(saliency_html(records, subtitle=subtitle, config=config), encoding="utf-8")
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
    if png_records > 0 and _matplotlib_imports():
        paths["png"] = folder / "saliency.png"
        saliency_png(records, paths["png"], max_records=png_records, config=config)
    return paths


def _matplotlib_imports() -> bool:
    """Whether matplotlib imports here (installed is not enough: a broken install raises)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
