"""The saliency map in a real browser: Debian's headless Chromium, driven by Selenium through
Debian's chromedriver, opens the page from a file:// URL; the tokens, their marks and the legend
render (visible, styled, counted), the hover values are the tokens' titles, nothing is fetched,
long responses wrap inside the page, and a screenshot is taken and checked for content.

Skips where Chromium, chromedriver or selenium is missing (local development), unless
NLFT_REQUIRE_BROWSER=1 (CI, whose .ci/run installs them) turns the skip into a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from nlft_kernels.saliency_map import MARKS, hover_text, saliency_html, weight_colour
from tests.test_saliency_map import synthetic_records

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1600",
]
INSTALL = "apt-get install -y --no-install-recommends chromium chromium-driver && pip install selenium"


def _find(name: str, debian_path: str) -> str | None:
    return shutil.which(name) or (debian_path if Path(debian_path).is_file() else None)


def _missing(reason: str):
    if os.environ.get("NLFT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"NLFT_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(f"{reason}; install with: {INSTALL}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = _find("chromium", "/usr/bin/chromium")
    driver_path = _find("chromedriver", "/usr/bin/chromedriver")
    if chromium is None or driver_path is None:
        _missing("Debian's chromium and chromium-driver are not installed")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # An explicit chromedriver: Selenium Manager is never asked to download one.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    records = synthetic_records()
    path = tmp_path_factory.mktemp("page") / "saliency.html"
    path.write_text(saliency_html(records, subtitle="model: synthetic"), encoding="utf-8")
    browser.get(path.as_uri())
    return browser, records


def _rgba(colour: str) -> str:
    """``#rrggbb`` as Selenium reports a computed colour."""
    return f"rgba({int(colour[1:3], 16)}, {int(colour[3:5], 16)}, {int(colour[5:7], 16)}, 1)"


def test_tokens_render_with_their_colours_and_hover_values(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver, records = page
    spans = driver.find_elements(By.CSS_SELECTOR, "section.record .response span.tok")
    tokens = [t for r in records for t in r.tokens]
    assert len(spans) == len(tokens)
    assert len(driver.find_elements(By.CSS_SELECTOR, "section.record")) == len(records)
    for span, token in list(zip(spans, tokens, strict=True))[:16]:
        assert span.is_displayed() and span.size["width"] > 0 and span.size["height"] > 0
        assert span.value_of_css_property("background-color") == _rgba(weight_colour(token.weight))
        assert span.get_attribute("title") == hover_text(token)
    # Hover one: the browser puts the pointer on it and the :hover style applies.
    target = spans[1]
    before = target.value_of_css_property("box-shadow")
    ActionChains(driver).move_to_element(target).perform()
    assert target.value_of_css_property("box-shadow") != before
    assert "p_b = 0.3000\np_s = 0.9850\n" in target.get_attribute("title")
    # Text: the HTML in a token and the question is text; no script element exists.
    assert spans[4].text == " <b>24</b>"  # pre-wrap keeps the leading space
    assert driver.execute_script("return document.scripts.length") == 0
    assert '<script>alert("x")</script>' in driver.find_element(By.CSS_SELECTOR, "#record-1 .question").text


def test_marks_render(page):
    from selenium.webdriver.common.by import By

    driver, records = page
    for mark in MARKS:
        expected = sum(getattr(t, mark) for r in records for t in r.tokens)
        found = driver.find_elements(By.CSS_SELECTOR, f".response span.tok.{mark}")
        assert len(found) == expected > 0, mark
        assert found[0].is_displayed()
    style = driver.execute_script(
        "const s = sel => getComputedStyle(document.querySelector('.response .tok.' + sel));"
        "return {saliency: s('saliency').outlineStyle, cluster: s('cluster').outlineStyle,"
        " unlikelihood: s('unlikelihood').textDecorationLine, killed: s('killed').textDecorationLine,"
        " killedImage: s('killed').backgroundImage, plain: s('special').outlineStyle};"
    )
    assert style["saliency"] == "solid" and style["cluster"] == "dashed" and style["plain"] == "none"
    assert "line-through" in style["unlikelihood"] and "underline" in style["killed"]
    assert style["killedImage"].startswith("repeating-linear-gradient")


def test_legend_renders(page):
    from selenium.webdriver.common.by import By

    driver, _ = page
    legend = driver.find_element(By.CSS_SELECTOR, "aside.legend")
    assert legend.is_displayed() and legend.location["y"] < 400
    scale = legend.find_element(By.CSS_SELECTOR, ".scale")
    assert scale.is_displayed() and scale.size["width"] > 150
    assert "linear-gradient" in scale.value_of_css_property("background-image")
    keys = legend.find_elements(By.CSS_SELECTOR, ".marks .key")
    assert [k.text for k in keys] == ["saliency", "unlikelihood", "cluster", "zeroed"]
    assert all(k.is_displayed() for k in keys)
    assert keys[0].value_of_css_property("outline-style") == "solid"
    for words in ("token weight", "1 (SFT)", "Hover a token for p_b, p_s, p_j"):
        assert words in legend.text


def test_long_responses_wrap_and_nothing_is_fetched(page):
    driver, _ = page
    layout = driver.execute_script(
        "const r = document.querySelector('#record-2 .response');"
        "return {page: document.documentElement.scrollWidth, view: window.innerWidth,"
        " box: r.getBoundingClientRect().width, lines: r.getClientRects().length,"
        " height: r.getBoundingClientRect().height,"
        " resources: performance.getEntriesByType('resource').length};"
    )
    assert layout["page"] <= layout["view"]  # no horizontal scrolling
    assert layout["box"] <= 64 * 16 and layout["height"] > 10 * 20  # max width; many wrapped lines
    assert layout["resources"] == 0


def test_screenshot(page, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    from selenium.webdriver.common.by import By

    driver, _ = page
    driver.execute_script("window.scrollTo(0, 0)")
    path = tmp_path / "saliency-page.png"
    assert driver.save_screenshot(str(path))
    pixels = (image.imread(path)[..., :3] * 255).round().astype(int)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 1000
    colours = {tuple(p) for p in pixels.reshape(-1, 3)[::5]}
    assert len(colours) > 200 and pixels.std() > 20  # text, token colours: not blank
    for weight in (1.6, 2.0):  # the saliency tokens' colours are on screen
        colour = [int(weight_colour(weight)[i : i + 2], 16) for i in (1, 3, 5)]
        assert (abs(pixels - colour).sum(-1) <= 6).sum() > 100, weight
    section = driver.find_element(By.CSS_SELECTOR, "#record-1")
    assert section.screenshot(str(tmp_path / "record-1.png"))
    assert image.imread(tmp_path / "record-1.png").std() > 0.05
    if os.environ.get("NLFT_SCREENSHOT_DIR"):  # to look at it
        shutil.copy(path, Path(os.environ["NLFT_SCREENSHOT_DIR"]) / path.name)
