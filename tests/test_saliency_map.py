"""The saliency map: the page builder on synthetic details (escaping, every mark, the legend,
the hover values, self-containment), the PNG, the per-token details against the trainer's loss
on a tiny Llama, ``nlft saliency`` and ``nlft demo`` end to end on it, and ``nlft saliency`` on
the embedded SmolLM2 (slow). The page in a real browser: tests/test_saliency_browser.py."""

from __future__ import annotations

import html
import json
import math
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from nlft_kernels.config import NLFTConfig
from nlft_kernels.saliency_map import (
    MARKS,
    NO_PNG,
    RecordSaliency,
    TokenSaliency,
    hover_text,
    saliency_details,
    saliency_html,
    saliency_png,
    token_pieces,
    weight_colour,
    write_saliency_map,
)
from nlft_kernels.saliency_map.page import mark_descriptions
from tests._cli import bad_input, nlft_env, nlft_ok, write_jsonl
from tests._tiny import require_embedded_smollm2, save_tiny_model, tiny_model, tiny_records, tiny_tokenizer

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
HOSTILE = '<script>alert("x")</script> & "quotes" \'single\''


def _token(text, weight, p_b=0.2, p_s=0.5, p_j=None, **marks) -> TokenSaliency:
    return TokenSaliency(text, 7, p_b, p_s, p_j, weight, loss=1.5 * weight, **marks)


def synthetic_records() -> list[RecordSaliency]:
    """Two records whose tokens carry every mark, every weight range, HTML and whitespace
    characters (newline-only, tab, control, empty) and, in the wrong one, a long response."""
    correct = RecordSaliency(
        0,
        f"Natalia sold 48 clips. {HOSTILE}\nHow many in all?",
        "48/2 = 24\n48 + 24 = 72\n#### 72",
        "",
        None,
        True,
        [
            _token("In", 0.7, 0.4, 0.6),
            _token(" May", 1.6, 0.3, 0.985, saliency=True),
            _token(" she", 1.01, 0.5, 0.96, cluster=True),
            _token(" sold", 0.97, 0.9, 0.92),
            _token(" <b>24</b>", 2.0, 0.5, 0.9999, saliency=True),
            _token(".\n\n", 0.5, 0.3, 0.3),
            _token("\t&amp;", 0.3, 0.00001234, 0.05),
            _token("x\x00y", 0.2, 0.1, 0.1),
            _token("", 0.2, 0.1, 0.1),
            _token("<|im_end|>", 0.9, 0.8, 0.9, special=True),
        ],
        10,
    )
    long_tail = [_token(f" word{i}", 0.0, 0.2, 0.3, 0.1, killed=True) for i in range(300)]
    wrong = RecordSaliency(
        1,
        "Weng earns $12 an hour. How much for 50 minutes?",
        "#### 10",
        "",
        f"The response multiplied minutes by an hourly rate.\n{HOSTILE}",
        False,
        [
            _token("50", 0.0, 0.3, 0.2, 0.25, killed=True),
            _token(" *", 1.2, 0.01, 0.02, 0.5, saliency=True, unlikelihood=True),
            _token(" 12", 0.0, 0.3, 0.3, 0.2, cluster=True, killed=True),
            _token(" = 600", 0.0, 0.4, 0.1, 0.3, cluster=True),
            *long_tail,
        ],
        400,
    )
    for record in (correct, wrong):
        record.response = "".join(t.text for t in record.tokens if not t.special)
    return [correct, wrong]


class _Spans(HTMLParser):
    """Every element's tag, classes and attributes, and the text inside token spans."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, set[str], dict]] = []
        self.tokens: list[dict] = []
        self._depth = 0  # > 0 inside a token span

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        self.elements.append((tag, classes, attrs))
        if tag == "span" and "tok" in classes:
            self.tokens.append({"classes": classes, "attrs": attrs, "text": ""})
            self._depth = 1
        elif self._depth and tag == "span":
            self._depth += 1

    def handle_endtag(self, tag):
        if self._depth and tag == "span":
            self._depth -= 1

    def handle_data(self, data):
        if self._depth:
            self.tokens[-1]["text"] += data


def parse(page: str) -> _Spans:
    parser = _Spans()
    parser.feed(page)
    parser.close()
    return parser


# ------------------------------------------------------------------------------ the page


def test_weight_colour_scale():
    assert weight_colour(1.0) == "#f7f7f7"  # SFT's weight: neutral
    assert weight_colour(0.0) == "#4393c3" and weight_colour(-3) == "#4393c3"
    assert weight_colour(2.0) == "#d6604d" and weight_colour(9.0) == "#d6604d"
    assert weight_colour(float("nan")) == weight_colour(0.0)
    reds = [int(weight_colour(w)[1:3], 16) for w in (0.0, 0.5, 1.0)]
    blues = [int(weight_colour(w)[5:7], 16) for w in (1.0, 1.5, 2.0)]
    assert reds == sorted(reds) and blues == sorted(blues, reverse=True)


def test_page_has_every_token_mark_and_the_legend():
    records = synthetic_records()
    page = saliency_html(records)
    tree = parse(page)
    assert len(tree.tokens) == sum(len(r.tokens) for r in records)
    for mark in MARKS:
        expected = [t for r in records for t in r.tokens if getattr(t, mark)]
        assert expected, mark  # the inputs exercise the mark
        assert sum(mark in s["classes"] for s in tree.tokens) == len(expected), mark
    assert sum("special" in s["classes"] for s in tree.tokens) == 1
    # The legend: the scale and a styled key per mark, with its meaning.
    keys = [classes for tag, classes, _ in tree.elements if "key" in classes]
    assert [set(MARKS) & k for k in keys] == [{m} | ({"saliency"} if m == "unlikelihood" else set()) for m in MARKS]
    assert sum("scale" in classes for _, classes, _ in tree.elements) == 1
    for text in mark_descriptions().values():
        assert html.escape(text) in page
    for name in ("saliency", "unlikelihood", "cluster", "zeroed", "token weight", "1 (SFT)"):
        assert name in page
    # A section per record, with its verdict, question and judgment.
    sections = [(classes, attrs) for tag, classes, attrs in tree.elements if tag == "section"]
    assert [a["id"] for _, a in sections] == ["record-1", "record-2"]
    assert [{"correct", "wrong"} & c for c, _ in sections] == [{"correct"}, {"wrong"}]
    assert "none (the response is correct)" in page
    assert "Showing the first 304 of the response's 400 tokens" in page


def test_token_colours_and_hover_values():
    records = synthetic_records()
    tree = parse(saliency_html(records))
    tokens = [t for r in records for t in r.tokens]
    for span, token in zip(tree.tokens, tokens, strict=True):
        assert span["attrs"]["style"] == f"background-color:{weight_colour(token.weight)}"
        title = span["attrs"]["title"]
        assert title == hover_text(token)
        assert float(span["attrs"]["data-w"]) == pytest.approx(token.weight, rel=1e-5)
        assert float(span["attrs"]["data-pb"]) == pytest.approx(token.p_base, rel=1e-5)
    first = tree.tokens[1]["attrs"]["title"].splitlines()
    assert first == [
        'token " May"',
        "p_b = 0.3000",
        "p_s = 0.9850",
        "p_j = - (correct response: no judge view)",
        "weight = 1.6000",
        "loss = 2.4000",
        "marks: saliency",
    ]
    assert "p_b = 1.23e-05" in tree.tokens[6]["attrs"]["title"]
    wrong = records[1].tokens[1]
    assert hover_text(wrong).splitlines()[3:5] == ["p_j = 0.5000", "weight = 1.2000"]
    assert hover_text(wrong).endswith("marks: saliency, unlikelihood")
    assert hover_text(records[1].tokens[2]).endswith("marks: cluster, zeroed")


def test_page_escapes_text_and_keeps_whitespace():
    records = synthetic_records()
    page = saliency_html(records, title="map <of> & more", subtitle=HOSTILE)
    tree = parse(page)
    # Nothing the records hold becomes markup: no script element, no <b> from a token.
    assert not [tag for tag, _, _ in tree.elements if tag in ("script", "b")]
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<title>map &lt;of&gt; &amp; more</title>" in page
    texts = [s["text"] for s in tree.tokens]
    assert texts[4] == " <b>24</b>"  # the parser unescapes: the text as the reader sees it
    assert texts[5] == ".\u21b5\n\u21b5\n"  # newlines kept (pre-wrap) with a visible glyph
    assert texts[6] == "\t&amp;"
    assert texts[7] == "x\\x00y"  # a control character as its escape
    assert texts[8] == "\u25cc"  # an empty token stays visible
    assert 'token "\\t&amp;"' in tree.tokens[6]["attrs"]["title"]
    assert "&#10;p_b = " in page  # tooltip lines
    # The question keeps its newline inside a pre-wrap block.
    assert "How many in all?" in page and "clips. &lt;script&gt;" in page
    assert re.search(r"\.text \{[^}]*white-space: pre-wrap", page)
    assert re.search(r"\.response \{[^}]*white-space: pre-wrap; overflow-wrap: anywhere", page)
    assert re.search(r"main \{ max-width: 64rem", page)


def test_page_is_self_contained():
    page = saliency_html(synthetic_records())
    lowered = page.lower()
    for needle in ("<script", "<link", "<img", "src=", "url(", "@import", "http:", "https:", "//fonts"):
        assert needle not in lowered, needle
    assert "default-src 'none'; style-src 'unsafe-inline'" in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_page_without_records_or_tokens():
    assert "No records." in saliency_html([])
    empty = RecordSaliency(0, "q", "a", "r", None, True, [], 5)
    assert "No response token fits within max_length" in saliency_html([empty])


# ------------------------------------------------------------------------------ the PNG


def test_png(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "saliency.png"
    saliency_png(synthetic_records(), path, max_records=2, max_tokens=120)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)[..., :3]
    height, width = pixels.shape[:2]
    assert width == 1500 and 400 < height < 3000
    rgb = (pixels * 255).round().astype(int)
    colours = {tuple(p) for p in rgb.reshape(-1, 3)[::7]}
    assert len(colours) > 100  # text, boxes, the scale: not a blank page
    # The token boxes are drawn in the page's colours: zeroed (0), saliency (1.6) and max (2.0).
    for weight in (0.0, 1.6, 2.0):
        colour = tuple(int(weight_colour(weight)[i : i + 2], 16) for i in (1, 3, 5))
        assert (abs(rgb - colour).sum(-1) <= 3).sum() > 200, weight
    # One record only: a shorter figure.
    saliency_png(synthetic_records(), tmp_path / "one.png", max_records=1)
    assert image.imread(tmp_path / "one.png").shape[0] < height


def test_write_saliency_map(tmp_path):
    records = synthetic_records()
    paths = write_saliency_map(records, tmp_path / "out", subtitle="model: synthetic", png_records=1)
    assert set(paths) == {"html", "jsonl", "png"} and all(p.is_file() for p in paths.values())
    assert "model: synthetic" in paths["html"].read_text(encoding="utf-8")
    rows = [json.loads(line) for line in paths["jsonl"].read_text(encoding="utf-8").splitlines()]
    assert [len(r["tokens"]) for r in rows] == [len(r.tokens) for r in records]
    assert rows[0]["tokens"][1]["saliency"] and rows[0]["loss"] == pytest.approx(records[0].loss)
    assert set(write_saliency_map(records, tmp_path / "no-png", png_records=0)) == {"html", "jsonl"}


# ------------------------------------------------------------------------------ the details


def test_token_pieces_add_up_to_the_text():
    tokenizer = tiny_tokenizer()
    text = "Natalia sold  48\n\n clips \u00e9\u4e2d \U0001f600\tend\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tokenizer, text, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "\n" in pieces and any(p.startswith(" ") for p in pieces)

    class Slow:  # no offsets: each token decoded on its own
        is_fast = False

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    assert token_pieces(Slow(), "ab", [97, 98]) == ["a", "b"]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_model(len(tokenizer)).eval(), tokenizer


def test_details_are_the_trainers_loss(tiny):
    """The details come from the training path: their sample losses average to nlft_batch_loss."""
    from nlft_kernels.training import NLFTCollator, encode_records, nlft_batch_loss

    model, tokenizer = tiny
    records = tiny_records()
    details = saliency_details(model, tokenizer, records, batch_size=3)
    batch = NLFTCollator(tokenizer.pad_token_id)(encode_records(records, tokenizer))
    with torch.no_grad():
        loss = nlft_batch_loss(model, batch, pad_token_id=tokenizer.pad_token_id)
    assert sum(r.loss for r in details) / len(details) == pytest.approx(float(loss), rel=1e-5)
    for record, source in zip(details, records, strict=True):
        assert (record.question, record.judgment, record.correct) == (source.question, source.judgment, source.correct)
        assert "".join(t.text for t in record.tokens[:-1]) == source.response
        assert record.tokens[-1].special and record.tokens[-1].text == tokenizer.eos_token
        assert len(record.tokens) == record.response_tokens and not record.truncated
        assert all(0 < t.p_base <= 1 and 0 < t.p_standard <= 1 and math.isfinite(t.weight) for t in record.tokens)
        assert all((t.p_judge is None) == source.correct for t in record.tokens)
    # Each record's details depend on that record only; the model runs in eval mode and keeps its own.
    model.train()
    one_by_one = saliency_details(model, tokenizer, records, batch_size=1)
    assert model.training
    model.eval()
    for a, b in zip(details, one_by_one, strict=True):
        assert [t.weight for t in a.tokens] == pytest.approx([t.weight for t in b.tokens], rel=1e-5)


def test_details_marks_follow_the_config(tiny):
    """A config under which every rule fires on the random model: the marks reach the tokens."""
    model, tokenizer = tiny
    config = NLFTConfig(correct_threshold=0.0025, ratio_threshold=1.0, judge_min_prob=1e-4, cluster_threshold=0.0)
    details = saliency_details(model, tokenizer, tiny_records(), config=config)
    tokens = [t for r in details for t in r.tokens]
    for mark in ("saliency", "unlikelihood", "cluster"):
        assert any(getattr(t, mark) for t in tokens), mark
    for t in tokens:
        assert not t.unlikelihood or t.saliency
        assert not t.killed or t.weight == 0
    killed = NLFTConfig(ratio_threshold=1.0, judge_min_prob=1e-4, saliency_fraction=0.0)
    wrong = saliency_details(model, tokenizer, tiny_records()[2:], config=killed)
    assert any(t.killed for r in wrong for t in r.tokens)


def test_details_truncated_by_max_length(tiny):
    from nlft_kernels.training import encode_record

    model, tokenizer = tiny
    records = tiny_records()[:1]
    full = saliency_details(model, tokenizer, records)[0]
    longest = max(len(v) for k, v in encode_record(records[0], tokenizer).items() if k.endswith("input_ids"))
    cut = saliency_details(model, tokenizer, records, max_length=longest - 5)[0]
    none = saliency_details(model, tokenizer, records, max_length=3)[0]
    assert len(cut.tokens) == len(full.tokens) - 5 and cut.truncated and cut.response_tokens == len(full.tokens)
    assert [t.text for t in cut.tokens] == [t.text for t in full.tokens[:-5]]
    assert none.tokens == [] and "No response token fits" in saliency_html([none])


# ------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _records_file(path: Path, records) -> Path:
    from nlft_kernels.training import save_records

    save_records(path, records)
    return path


def test_nlft_saliency_on_a_tiny_model(model_dir, tmp_path):
    data = _records_file(tmp_path / "records.jsonl", tiny_records())
    out = tmp_path / "map"
    done = nlft_ok("saliency", "--model", model_dir, "--data", data, "--out", out, "--max-records", "3")
    page = (out / "saliency.html").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in (out / "saliency.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and (out / "saliency.png").is_file()
    tree = parse(page)
    assert len(tree.tokens) == sum(len(r["tokens"]) for r in rows)
    assert [a["id"] for tag, _, a in tree.elements if tag == "section"] == ["record-1", "record-2", "record-3"]
    assert f"model: {model_dir}" in page
    assert f"wrote the saliency map to {out / 'saliency.html'} and {out / 'saliency.png'}" in done.stdout


def test_nlft_saliency_takes_the_nlft_config_flags(model_dir, tmp_path):
    """`--other-power 2` reaches the config the map is computed with: the weights written are
    those of NLFTConfig(other_power=2), and differ from the default config's on these records."""
    from nlft_kernels.recipes.models import load_model

    records = tiny_records()
    data = _records_file(tmp_path / "records.jsonl", records)
    out = tmp_path / "map"
    nlft_ok("saliency", "--model", model_dir, "--data", data, "--out", out, "--png-records", "0", "--other-power", "2")

    def weights(row: dict) -> list[float]:
        return [token["weight"] for token in row["tokens"]]

    written = [weights(json.loads(line)) for line in (out / "saliency.jsonl").read_text().splitlines()]
    model, tokenizer = load_model(str(model_dir))
    expected, default = (
        [weights(d.to_dict()) for d in saliency_details(model, tokenizer, records, config=config)]
        for config in (NLFTConfig(other_power=2.0), NLFTConfig())
    )
    assert written == expected
    assert written != default, "the flag must change the weights of these records"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["saliency", "--data", "/no/such.jsonl", "--out", "x"], "no such file"),
        (["saliency", "--out", "x"], "required: --data"),
        (["saliency", "--data", __file__, "--out", "x", "--max-records", "0"], "must be >= 1"),
    ],
)
def test_nlft_saliency_bad_arguments(argv, message):
    assert message in bad_input(*argv)


def test_nlft_saliency_bad_records(tmp_path):
    path = write_jsonl(tmp_path / "records.jsonl", [{"question": "q", "response": "r"}])
    assert "line 1: missing field 'answer'" in bad_input("saliency", "--data", path, "--out", tmp_path / "out")


@pytest.mark.parametrize("matplotlib", [True, False], ids=["matplotlib", "no matplotlib"])
def test_demo_writes_the_saliency_map(model_dir, tmp_path, matplotlib):
    """`nlft demo` (a real process, the smallest settings) writes the map of the records it trained
    on; without matplotlib (the README's demo install, ``[train]``, has none) it says why there is
    no PNG."""
    out, env = tmp_path / "demo", nlft_env()
    if not matplotlib:  # a matplotlib that fails to import, first on the path
        (tmp_path / "hide" / "matplotlib").mkdir(parents=True)
        (tmp_path / "hide" / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path / "hide"), env.get("PYTHONPATH")) if p)
    done = nlft_ok("demo", "--model", model_dir, "--train-size", "2", "--test-size", "2", "--steps", "1",
                   "--batch-size", "2", "--generation-batch", "2", "--max-new-tokens", "4", "--out", out,
                   env=env)  # fmt: skip
    records = [json.loads(line) for line in (out / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    tree = parse((out / "saliency.html").read_text(encoding="utf-8"))
    assert len([tag for tag, _, _ in tree.elements if tag == "section"]) == len(records) == 2
    assert (out / "saliency.png").is_file() == matplotlib
    assert (NO_PNG in done.stdout) != matplotlib, done.stdout[-2000:]


@pytest.mark.slow
def test_nlft_saliency_on_smollm2(tmp_path):
    """Two tiny records on the embedded SmolLM2: a correct response that is the reference answer
    itself (the standard view predicts it: saliency tokens) and a wrong one with its judgment."""
    from nlft_kernels.training import NLFTRecord

    require_embedded_smollm2()
    answer = "She sold 48 / 2 = 24 clips in May.\nIn all she sold 48 + 24 = 72 clips.\n#### 72"
    records = [
        NLFTRecord("Natalia sold 48 clips in April and half as many in May. How many in all?", answer, answer),
        NLFTRecord(
            "Weng earns $12 an hour. She did 50 minutes of babysitting. How much did she earn?",
            "She earned 50 * 12 = 600 dollars.\n#### 600",
            "12 / 60 = 0.2 per minute.\n0.2 * 50 = 10.\n#### 10",
            "The response multiplied the minutes by the hourly rate: 50 * 12 = 600 is wrong. The correct answer is 10.",
            False,
        ),
    ]
    data = _records_file(tmp_path / "records.jsonl", records)
    out = tmp_path / "map"
    done = nlft_ok("saliency", "--data", data, "--out", out)
    rows = [json.loads(line) for line in (out / "saliency.jsonl").read_text(encoding="utf-8").splitlines()]
    tree = parse((out / "saliency.html").read_text(encoding="utf-8"))
    assert len(tree.tokens) == sum(len(r["tokens"]) for r in rows) > 20
    assert [r["correct"] for r in rows] == [True, False]
    for row, record in zip(rows, records, strict=True):
        assert "".join(t["text"] for t in row["tokens"] if not t["special"]) == record.response
        assert all(0 < t["p_base"] <= 1 and 0 <= t["weight"] <= 2 for t in row["tokens"])
    correct_tokens = rows[0]["tokens"]
    assert any(t["saliency"] for t in correct_tokens)  # the standard view, shown this answer, predicts it
    assert all(t["p_judge"] is None for t in correct_tokens)
    assert all(t["p_judge"] is not None for t in rows[1]["tokens"])
    assert (out / "saliency.png").stat().st_size > 10_000
    assert "wrote the saliency map" in done.stdout
