"""The saliency map as one self-contained HTML page: inline CSS, no script, no font or image
files, nothing fetched (a Content-Security-Policy that allows only the inline styles says so).

Each record shows its question and judgment, then its response token by token: the background
is the token weight on a diverging scale (blue below 1, white at 1, the weight SFT gives
every token, red above); saliency tokens are framed, unlikelihood tokens struck through,
cluster tokens in a dashed frame, zeroed tokens hatched with a dotted underline; hovering a token
shows p_b, p_s, p_j and its weight (its ``title``; the same values are in ``data-*``
attributes for scripts).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence

from nlft_kernels.config import NLFTConfig
from nlft_kernels.saliency_map.details import MARKS, RecordSaliency, TokenSaliency

# The weight scale: 1 is SFT's weight; NLFT's weights lie in [0, 2] with the default config
# (larger ones take the top colour).
WEIGHT_STOPS = ((0.0, "#4393c3"), (0.5, "#92c5de"), (1.0, "#f7f7f7"), (1.5, "#f4a582"), (2.0, "#d6604d"))
WEIGHT_MAX = WEIGHT_STOPS[-1][0]
MARK_NAMES = {"saliency": "saliency", "unlikelihood": "unlikelihood", "cluster": "cluster", "killed": "zeroed"}
NEWLINE_GLYPH = "\u21b5"  # shown before each newline inside a token, so that newline tokens are visible
EMPTY_GLYPH = "\u25cc"  # a token with no characters of its own (the tail of a split character)


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def weight_colour(weight: float) -> str:
    """The ``#rrggbb`` colour of a token weight on the page's scale (clamped to [0, WEIGHT_MAX])."""
    w = min(max(float(weight), 0.0), WEIGHT_MAX) if weight == weight else 0.0
    for (low, c_low), (high, c_high) in zip(WEIGHT_STOPS, WEIGHT_STOPS[1:], strict=False):
        if w <= high:
            t = (w - low) / (high - low)
            mixed = (round(a + t * (b - a)) for a, b in zip(_rgb(c_low), _rgb(c_high), strict=True))
            return "#" + "".join(f"{v:02x}" for v in mixed)
    return WEIGHT_STOPS[-1][1]


def mark_descriptions(config: NLFTConfig = NLFTConfig()) -> dict[str, str]:
    """What each mark means and how it looks, with ``config``'s thresholds (the legend's text)."""
    tau, ratio = config.correct_threshold, config.ratio_threshold
    return {
        "saliency": f"framed: a saliency token (correct response: p_s > {tau:g}; wrong response: "
        f"p_j / p_b > {ratio:g}, p_j / p_s > {ratio:g} and p_j > {config.judge_min_prob:g})",
        "unlikelihood": "struck through: a wrong response's saliency token, trained by unlikelihood "
        "(loss -w log(1 - p_b): NLFT makes it less likely)",
        "cluster": "dashed frame: a cluster neighbour of a saliency token (hidden-state walk; "
        f"weight (p_s / {tau:g})^{config.cluster_power:g} in a correct response, 0 in a wrong one)",
        "killed": "hatched, dotted underline: zeroed, an ordinary token of a wrong response in which more "
        f"than {100 * config.saliency_fraction:g}% of the tokens are saliency tokens (weight 0)",
    }


def _prob(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.4f}" if p >= 1e-3 or p == 0 else f"{p:.2e}"


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def _attr(text: str) -> str:
    """An attribute value: escaped, newlines kept as line breaks of the tooltip."""
    return _escape(text).replace("\n", "&#10;")


def _visible(text: str) -> str:
    """A token's characters as HTML: escaped; newlines get a glyph before them (the response box
    keeps whitespace, so the line still breaks); control characters as ``\\xNN``."""
    if not text:
        return f'<span class="glyph">{EMPTY_GLYPH}</span>'
    out = []
    for ch in text:
        if ch == "\n":
            out.append(f'<span class="glyph">{NEWLINE_GLYPH}</span>\n')
        elif ch == "\t":
            out.append("\t")
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f'<span class="glyph">\\x{ord(ch):02x}</span>')
        else:
            out.append(_escape(ch))
    return "".join(out)


def hover_text(token: TokenSaliency) -> str:
    """The token's tooltip: its text (JSON-quoted, so whitespace shows), p_b, p_s, p_j, weight,
    loss and marks, one per line."""
    names = [MARK_NAMES[m] for m in token.marks]
    judge = _prob(token.p_judge) if token.p_judge is not None else "- (correct response: no judge view)"
    lines = [
        f"token {json.dumps(token.text, ensure_ascii=False)}" + (" (end of response)" if token.special else ""),
        f"p_b = {_prob(token.p_base)}",
        f"p_s = {_prob(token.p_standard)}",
        f"p_j = {judge}",
        f"weight = {token.weight:.4f}",
        f"loss = {token.loss:.4f}",
        f"marks: {', '.join(names) if names else 'none'}",
    ]
    return "\n".join(lines)


def token_html(token: TokenSaliency) -> str:
    """One token as a ``<span class="tok ...">``: weight colour, marks as classes, values on hover."""
    classes = " ".join(["tok", *token.marks] + (["special"] if token.special else []))
    data = (
        f'data-pb="{token.p_base:.6g}" data-ps="{token.p_standard:.6g}" '
        f'data-pj="{"" if token.p_judge is None else f"{token.p_judge:.6g}"}" data-w="{token.weight:.6g}"'
    )
    return (
        f'<span class="{classes}" style="background-color:{weight_colour(token.weight)}" '
        f'title="{_attr(hover_text(token))}" {data}>{_visible(token.text)}</span>'
    )


def _legend(config: NLFTConfig) -> str:
    stops = ", ".join(f"{c} {100 * w / WEIGHT_MAX:g}%" for w, c in WEIGHT_STOPS)
    ticks = "".join(
        f"<span>{w:g}{' (SFT)' if w == 1 else ''}{'+' if w == WEIGHT_MAX else ''}</span>" for w, _ in WEIGHT_STOPS
    )
    samples = {"saliency": 1.6, "unlikelihood": 1.2, "cluster": 1.01, "killed": 0.0}
    # An unlikelihood token is always a saliency token too: its key looks like one.
    looks = {"unlikelihood": "saliency unlikelihood"}
    items = "".join(
        f'<li><span class="key {looks.get(m, m)}" style="background-color:{weight_colour(samples[m])}">'
        f"{MARK_NAMES[m]}</span> {_escape(text)}</li>"
        for m, text in mark_descriptions(config).items()
    )
    return (
        '<aside class="legend" aria-label="legend">'
        '<div class="scale-block"><span class="legend-title">token weight</span>'
        f'<div class="scale" style="background:linear-gradient(to right, {stops})"></div>'
        f'<div class="ticks">{ticks}</div></div>'
        f'<ul class="marks">{items}</ul>'
        '<p class="hint">Hover a token for p_b, p_s, p_j (its probability under the base, standard and '
        "judge views), its weight and its loss.</p></aside>"
    )


def _text_block(text: str | None, empty: str) -> str:
    if text is None or not text.strip():
        return f'<span class="none">{_escape(empty)}</span>'
    return _escape(text)


def record_html(record: RecordSaliency, number: int | None = None) -> str:
    """One record as a ``<section class="record">``."""
    number = record.index + 1 if number is None else number
    verdict = "correct" if record.correct else "wrong"
    counts = record.counts()
    stats = [f"{counts['tokens']} tokens"] + [f"{counts[m]} {MARK_NAMES[m]}" for m in MARKS]
    if record.tokens:
        mean = sum(t.weight for t in record.tokens) / len(record.tokens)
        stats += [f"mean weight {mean:.3f}", f"sample loss {record.loss:.3f}"]
    tokens = "".join(token_html(t) for t in record.tokens)
    if not record.tokens:
        note = '<p class="note">No response token fits within max_length: nothing to show.</p>'
    elif record.truncated:
        note = (
            f'<p class="note">Showing the first {len(record.tokens)} of the response\'s '
            f"{record.response_tokens} tokens (max_length).</p>"
        )
    else:
        note = ""
    judgment = _text_block(record.judgment, "none (the response is correct)")
    return (
        f'<section class="record {verdict}" id="record-{number}">'
        f'<h2>Record {number} <span class="badge {verdict}">{verdict}</span></h2>'
        '<dl class="meta">'
        f'<dt>Question</dt><dd class="text question">{_text_block(record.question, "(empty)")}</dd>'
        f'<dt>Judgment</dt><dd class="text judgment">{judgment}</dd>'
        "</dl>"
        '<details class="reference"><summary>Reference answer</summary>'
        f'<div class="text">{_text_block(record.answer, "(empty)")}</div></details>'
        f'<p class="stats">{" &middot; ".join(stats)}</p>'
        f'<div class="response" aria-label="response tokens">{tokens}</div>{note}'
        "</section>"
    )


CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f4f2; color: #1b1b1b;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; }
main { max-width: 64rem; margin: 0 auto; padding: 1.25rem 1.25rem 3rem; }
h1 { font-size: 1.5rem; margin: .25rem 0 .25rem; }
h2 { font-size: 1.1rem; margin: 0 0 .5rem; }
.subtitle { color: #555; margin: 0 0 .75rem; overflow-wrap: anywhere; }
.legend { background: #fff; border: 1px solid #d5d5d0;
  border-radius: 6px; padding: .6rem .9rem; display: flex; flex-wrap: wrap; gap: .4rem 1.5rem;
  align-items: flex-start; box-shadow: 0 1px 3px rgba(0,0,0,.08); font-size: 13px; }
@media (min-height: 56rem) { .legend { position: sticky; top: 0; z-index: 2; } }
.scale-block { min-width: 15rem; }
.legend-title { font-weight: 600; display: block; margin-bottom: .2rem; }
.scale { height: .9rem; border: 1px solid #999; border-radius: 2px; }
.ticks { display: flex; justify-content: space-between; color: #444; font-size: 12px; }
.marks { list-style: none; margin: 0; padding: 0; flex: 1 1 26rem; }
.marks li { margin: .15rem 0; }
.hint { flex-basis: 100%; margin: .1rem 0 0; color: #555; }
.key { display: inline-block; min-width: 6.5rem; text-align: center; padding: 0 .3rem; margin-right: .35rem;
  border-radius: 2px; line-height: 1.6; }
section.record { background: #fff; border: 1px solid #d5d5d0; border-radius: 6px; margin: 1.25rem 0;
  padding: 1rem 1.25rem; }
section.record.wrong { border-left: 5px solid #b2182b; }
section.record.correct { border-left: 5px solid #1b7837; }
.badge { font-size: .8rem; font-weight: 600; padding: .05rem .45rem; border-radius: 1rem; vertical-align: middle;
  color: #fff; }
.badge.correct { background: #1b7837; }
.badge.wrong { background: #b2182b; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .3rem .9rem; margin: 0 0 .5rem; }
dl.meta dt { font-weight: 600; color: #444; }
dl.meta dd { margin: 0; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
.none { color: #777; font-style: italic; }
details.reference { margin: 0 0 .5rem; color: #333; }
details.reference summary { cursor: pointer; color: #444; font-weight: 600; }
.stats { color: #555; font-size: 13px; margin: .25rem 0 .5rem; }
.note { color: #8a4b00; font-size: 13px; margin: .5rem 0 0; }
.response { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 16px; line-height: 2; padding: .6rem .7rem;
  border: 1px solid #e2e2de; border-radius: 4px; background: #fcfcfb; }
.tok { border-radius: 2px; padding: 0 1px; box-shadow: inset -1px 0 rgba(0,0,0,.14); cursor: help;
  -webkit-box-decoration-break: clone; box-decoration-break: clone; }
.tok:hover { box-shadow: inset 0 0 0 2px #f1a340; }
.saliency { outline: 2px solid #111; outline-offset: -1px; font-weight: 600; }
.cluster { outline: 2px dashed #6a3d9a; outline-offset: -1px; }
.unlikelihood { text-decoration-line: line-through; text-decoration-color: #b2182b;
  text-decoration-thickness: 2px; }
.killed { background-image: repeating-linear-gradient(135deg, transparent 0 3px, rgba(255,255,255,.6) 3px 5px);
  text-decoration-line: underline; text-decoration-style: dotted; text-decoration-color: #222;
  text-decoration-thickness: 2px; text-underline-offset: 3px; }
.special { font-style: italic; color: #555; font-size: .85em; }
.glyph { color: #8c8c8c; font-weight: normal; }
"""


def saliency_html(
    records: Sequence[RecordSaliency],
    *,
    title: str = "NLFT saliency map",
    subtitle: str | None = None,
    config: NLFTConfig = NLFTConfig(),
) -> str:
    """The whole page for ``records`` (from :func:`nlft_kernels.saliency_map.saliency_details`):
    a header (``title``, ``subtitle``, counts and ``config``'s constants), the legend and one
    section per record."""
    wrong = sum(not r.correct for r in records)
    summary = (
        f"{len(records)} records ({wrong} wrong, {len(records) - wrong} correct); tau = {config.correct_threshold:g}, "
        f"ratio threshold {config.ratio_threshold:g}, saliency fraction {config.saliency_fraction:g}, "
        f"clusters: {config.cluster_criterion}"
        + (f" {config.cluster_threshold:g}" if config.cluster_criterion != "off" else "")
    )
    lines = [_escape(subtitle)] if subtitle else []
    lines.append(_escape(summary))
    body = "".join(record_html(r) for r in records)
    if not records:
        body = '<p class="note">No records.</p>'
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_escape(title)}</title><style>{CSS}</style></head>\n"
        f"<body><main><h1>{_escape(title)}</h1>"
        + "".join(f'<p class="subtitle">{line}</p>' for line in lines)
        + _legend(config)
        + f"\n{body}\n</main></body></html>\n"
    )
