"""The saliency map of the first records as a PNG (matplotlib), for papers and READMEs: the
page's colours and marks, the response flowing as text with each token on its weight colour.

The layout is computed in pixels with Agg's own text metrics, then drawn on one axes that
spans the figure (no pyplot: the caller's backend is left alone).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from nlft_kernels.config import NLFTConfig
from nlft_kernels.saliency_map.details import RecordSaliency, TokenSaliency
from nlft_kernels.saliency_map.page import EMPTY_GLYPH, MARK_NAMES, NEWLINE_GLYPH, WEIGHT_MAX, weight_colour

FONT_SIZE = 9.0  # points
FONT = "DejaVu Sans"  # ships with matplotlib
EDGES = {"saliency": ("#111111", "solid"), "cluster": ("#6a3d9a", (0, (2.5, 1.5)))}
STRIKE, HATCH = "#b2182b", "#ffffff"


@dataclass
class _Box:
    """A drawing instruction in pixels (y grows downwards): a token box or a line of prose."""

    x: float
    y: float
    text: str
    width: float = 0.0
    token: TokenSaliency | None = None
    colour: str = "#1b1b1b"
    weight: str = "normal"
    style: str = "normal"
    size: float = FONT_SIZE


def _shown(text: str) -> str:
    """A token segment as drawn: tabs as spaces, control characters as U+FFFD (DejaVu Sans has
    no control pictures)."""
    text = text.replace("\t", "    ")
    return "".join("\ufffd" if ord(c) < 0x20 or c == "\x7f" else c for c in text)


class _Layout:
    def __init__(self, width_px: int, dpi: float, margin: float):
        from matplotlib.backends.backend_agg import RendererAgg
        from matplotlib.font_manager import FontProperties

        self.renderer = RendererAgg(width_px, 16, dpi)
        self.fonts: dict[tuple, FontProperties] = {}
        self.font_properties = FontProperties
        self.width, self.margin = width_px, margin
        self.line = FONT_SIZE * dpi / 72 * 1.85
        self.boxes: list[_Box] = []
        self.y = margin

    def font(self, size: float = FONT_SIZE, weight: str = "normal", style: str = "normal"):
        key = (size, weight, style)
        if key not in self.fonts:
            self.fonts[key] = self.font_properties(family=FONT, size=size, weight=weight, style=style)
        return self.fonts[key]

    def text_width(self, text: str, font) -> float:
        # Bars around the text keep its leading and trailing spaces in the measure.
        measure = self.renderer.get_text_width_height_descent
        return measure(f"|{text}|", font, ismath=False)[0] - measure("||", font, ismath=False)[0]

    def prose(self, text: str, max_lines: int, **style) -> None:
        """Word-wrapped ``text`` (whitespace collapsed), at most ``max_lines`` lines, then an ellipsis."""
        font = self.font(**{k: v for k, v in style.items() if k in ("size", "weight", "style")})
        room = self.width - 2 * self.margin
        lines, current = [], ""
        for word in text.split():
            candidate = f"{current} {word}" if current else word
            if current and self.text_width(candidate, font) > room:
                lines.append(current)
                current = word
            else:
                current = candidate
        if current:
            lines.append(current)
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            while lines[-1] and self.text_width(lines[-1] + " \u2026", font) > room:
                lines[-1] = lines[-1][:-1]
            lines[-1] += " \u2026"
        height = style.get("size", FONT_SIZE) / FONT_SIZE * self.line * 0.8
        for line in lines:
            self.boxes.append(_Box(self.margin, self.y, line, **style))
            self.y += height

    def tokens(self, tokens: Sequence[TokenSaliency]) -> None:
        """The tokens flowing as text: wrapped at the right margin, broken at newlines."""
        x = self.margin
        right = self.width - self.margin
        pad = 4.0
        for token in tokens:
            parts = token.text.split("\n") if token.text else [""]
            for k, part in enumerate(parts):
                newline = k < len(parts) - 1
                label = _shown(part) + (NEWLINE_GLYPH if newline else "")
                if not label and len(parts) == 1:
                    label = EMPTY_GLYPH
                if label:
                    style = "italic" if token.special else "normal"
                    weight = "bold" if token.saliency else "normal"
                    width = self.text_width(label, self.font(weight=weight, style=style)) + pad
                    if x + width > right and x > self.margin:
                        x, self.y = self.margin, self.y + self.line
                    self.boxes.append(_Box(x, self.y, label, width, token, weight=weight, style=style))
                    x += width
                if newline:
                    x, self.y = self.margin, self.y + self.line
        self.y += self.line

    def legend(self, config: NLFTConfig) -> None:
        self.y += self.line * 0.3
        self.boxes.append(_Box(self.margin, self.y, "token weight", weight="bold"))
        self.boxes.append(_Box(self.margin, self.y + self.line, "", 0.0, None, colour="scale"))
        self.y += 2.3 * self.line
        x = self.margin
        samples = {"saliency": 1.6, "unlikelihood": 1.2, "cluster": 1.01, "killed": 0.0}
        for mark, weight in samples.items():
            token = TokenSaliency(MARK_NAMES[mark], 0, 0.0, 0.0, None, weight, **{mark: True})
            if mark == "unlikelihood":
                token.saliency = True
            weight = "bold" if token.saliency else "normal"
            width = self.text_width(token.text, self.font(weight=weight)) + 10
            self.boxes.append(_Box(x, self.y, token.text, width, token, weight=weight))
            x += width + 12
        self.y += self.line * 1.1
        self.prose(
            "framed: saliency; struck through: unlikelihood (a wrong response's saliency token); dashed: cluster "
            "neighbour; hatched, dotted underline: zeroed (a wrong response with more than "
            f"{100 * config.saliency_fraction:g}% saliency tokens). p_b, p_s, p_j per token: hover them in "
            "saliency.html.",
            3,
            colour="#555555",
            size=7.5,
        )


def _draw(ax, layout: _Layout, scale_width: float) -> None:
    from matplotlib.patches import Rectangle

    line = layout.line
    for box in layout.boxes:
        font = layout.font(box.size, box.weight, box.style)
        if box.colour == "scale":  # the weight scale: thin slices, then ticks
            steps = 200
            for i in range(steps):
                w = WEIGHT_MAX * (i + 0.5) / steps
                x = box.x + scale_width * i / steps
                ax.add_patch(
                    Rectangle((x, box.y), scale_width / steps + 0.6, line * 0.55, color=weight_colour(w), lw=0)
                )
            ax.add_patch(Rectangle((box.x, box.y), scale_width, line * 0.55, fill=False, ec="#888888", lw=0.6))
            for k in range(5):
                value = WEIGHT_MAX * k / 4
                label = f"{value:g}" + (" (SFT)" if value == 1 else "") + ("+" if value == WEIGHT_MAX else "")
                ha = "left" if k == 0 else "right" if k == 4 else "center"
                ax.text(box.x + scale_width * k / 4, box.y + line * 0.95, label, ha=ha, va="center", fontsize=7.5,
                        color="#444444", parse_math=False)  # fmt: skip
            continue
        if box.token is None:
            ax.text(box.x, box.y + line * 0.4, box.text, fontproperties=font, color=box.colour, va="center",
                    parse_math=False)  # fmt: skip
            continue
        token = box.token
        top, height = box.y + 1.5, line - 4
        edge, linestyle = next((EDGES[m] for m in ("saliency", "cluster") if getattr(token, m)), ("none", "solid"))
        ax.add_patch(
            Rectangle(
                (box.x, top), box.width - 1, height, facecolor=weight_colour(token.weight), edgecolor=edge,
                linestyle=linestyle, linewidth=1.1 if edge != "none" else 0,
            )
        )  # fmt: skip
        if token.killed:  # switched off: white stripes over the weight colour
            ax.add_patch(Rectangle((box.x, top), box.width - 1, height, fill=False, hatch="///", ec=HATCH, lw=0))
        colour = "#555555" if token.special else "#1b1b1b"
        middle = top + height / 2
        ax.text(box.x + 2, middle, box.text, fontproperties=font, color=colour, va="center", ha="left",
                parse_math=False)  # fmt: skip
        if token.unlikelihood:
            ax.plot([box.x, box.x + box.width - 1], [middle, middle], color=STRIKE, lw=1.2, solid_capstyle="butt")
        if token.killed:
            ax.plot([box.x + 1, box.x + box.width - 2], [top + height - 1.5] * 2, color="#333333", lw=1.0,
                    linestyle=(0, (1, 1.5)))  # fmt: skip


def saliency_png(
    records: Sequence[RecordSaliency],
    path: str | os.PathLike,
    *,
    max_records: int = 3,
    max_tokens: int = 240,
    title: str = "NLFT saliency map",
    width_inches: float = 10.0,
    dpi: float = 150,
    config: NLFTConfig = NLFTConfig(),
) -> None:
    """Write the first ``max_records`` records (each cut to ``max_tokens`` tokens) as a PNG at
    ``path``: per record the verdict, question and judgment, then the response's tokens on
    their weight colours with the page's marks; the weight scale and the marks' key below."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # glyphs DejaVu Sans lacks (e.g. CJK) draw as boxes
        _write_png(records, path, max_records, max_tokens, title, width_inches, dpi, config)


def _write_png(records, path, max_records, max_tokens, title, width_inches, dpi, config) -> None:
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width_px = int(width_inches * dpi)
    layout = _Layout(width_px, dpi, margin=0.25 * dpi)
    layout.prose(title, 1, size=12.0, weight="bold")
    layout.y += layout.line * 0.3
    shown = list(records)[:max_records]
    for record in shown:
        verdict = "correct" if record.correct else "wrong"
        layout.prose(f"Record {record.index + 1} ({verdict}): {record.question}", 2, weight="bold")
        if record.judgment:
            layout.prose(f"Judgment: {record.judgment}", 2, style="italic", colour="#444444")
        layout.y += layout.line * 0.2
        layout.tokens(record.tokens[:max_tokens])
        hidden = len(record.tokens) - max_tokens
        if hidden > 0:
            layout.prose(f"... {hidden} more tokens (see saliency.html)", 1, colour="#777777", size=7.5)
        layout.y += layout.line * 0.4
    if not shown:
        layout.prose("No records.", 1)
    layout.legend(config)
    height_px = layout.y + layout.margin

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width_px)
    ax.set_ylim(height_px, 0)
    ax.axis("off")
    with rc_context({"hatch.linewidth": 1.2}):
        _draw(ax, layout, scale_width=min(3.2 * dpi, width_px - 2 * layout.margin))
        fig.savefig(path, dpi=dpi, facecolor="white")
