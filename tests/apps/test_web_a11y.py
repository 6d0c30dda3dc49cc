"""The web app is accessible and responsive, checked in a real browser: axe-core
(``axe-playwright-python``) finds 0 serious or critical violations on every tab in the light and
the dark theme; WAI-ARIA tabs follow the arrow keys; status, errors and progress are live
regions; a photo dropped anywhere on the page is used (the page never navigates away); a refused
upload leaves nothing drawn; no tab overflows a 390 px phone screen.

``LORASYNTH_WEBAPP_SCREENSHOTS=docs`` also writes one small PNG per tab (README's screenshots).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from PIL import Image

from server_helpers import astronaut_png_bytes
from web_helpers import browser_context, open_page, wait_text

TABS = ("synth", "gallery", "blend", "library")
PANEL = "#preview-panel "


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    """A page with a session on every tab: a photo, a LoRA, a base-vs-LoRA preview, a blend, the library."""
    with browser_context(tmp_path_factory) as context:
        pg = open_page(context, server)
        photo = tmp_path_factory.mktemp("photos") / "astronaut.png"
        photo.write_bytes(astronaut_png_bytes())
        pg.set_input_files("#photo", str(photo))
        wait_text(pg, "#faces-status", "1 face(s) found")
        pg.fill("#seed", "7")
        pg.click("#synthesize")
        wait_text(pg, "#results .result-title", "seed 7")
        pg.fill(PANEL + ".steps", "3")
        pg.select_option(PANEL + ".size", "128")
        pg.check(PANEL + ".compare")
        pg.click(PANEL + ".generate")
        wait_text(pg, PANEL + ".gen-status", "done (3 steps)")
        pg.click("#tab-library")
        pg.wait_for_selector("#lib-table tbody tr")
        wait_text(pg, "#map-status", "red:")
        pg.click("#lib-table tbody tr:nth-child(2) .lib-add")
        pg.click("#tab-blend")
        pg.click("#blend-run")
        wait_text(pg, "#blend-status", "exact")
        pg.click("#tab-synth")
        yield pg


def serious(page) -> list[str]:
    from axe_playwright_python.sync_playwright import Axe

    violations = Axe().run(page).response["violations"]
    return [f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes']][:3]}"
            for v in violations if v["impact"] in ("serious", "critical")]


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_axe_finds_no_serious_violation_on_any_tab(page, scheme):
    page.emulate_media(color_scheme=scheme)
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert (background == "rgb(18, 21, 28)") == (scheme == "dark")
    shots = os.environ.get("LORASYNTH_WEBAPP_SCREENSHOTS")
    for tab in TABS:
        page.click(f"#tab-{tab}")
        if tab == "library":
            wait_text(page, "#map-status", "red:")
        assert serious(page) == [], (scheme, tab)
        if shots and scheme == "light":
            out = Path(shots) / f"webapp_{tab}.png"
            page.screenshot(path=str(out))
            Image.open(out).convert("RGB").quantize(128).save(out, optimize=True)
    page.emulate_media(color_scheme="light")
    page.click("#tab-synth")


def test_tabs_follow_wai_aria_and_arrow_keys(page):
    assert page.get_attribute("#tablist", "role") == "tablist"
    page.focus("#tab-synth")

    def current():
        return page.evaluate("""() => [document.activeElement.id,
            [...document.querySelectorAll('[role=tab]')].filter(t => t.getAttribute('aria-selected') === 'true').map(t => t.id),
            [...document.querySelectorAll('[role=tabpanel]')].filter(p => !p.hidden).map(p => p.id)]""")

    page.keyboard.press("ArrowRight")
    assert current() == ["tab-gallery", ["tab-gallery"], ["gallery"]]
    page.keyboard.press("End")
    assert current() == ["tab-library", ["tab-library"], ["library"]]
    page.keyboard.press("ArrowRight")  # wraps around
    assert current() == ["tab-synth", ["tab-synth"], ["synth"]]
    page.keyboard.press("ArrowLeft")
    assert current() == ["tab-library", ["tab-library"], ["library"]]
    page.keyboard.press("Home")
    assert current() == ["tab-synth", ["tab-synth"], ["synth"]]
    # one tab stop for the whole tablist (roving tabindex); the panels name their tab
    assert page.eval_on_selector_all("[role=tab]", "ts => ts.map(t => t.tabIndex)") == [0, -1, -1, -1]
    assert page.get_attribute("#library", "aria-labelledby") == "tab-library"


def test_live_regions_and_a_refused_upload_leaves_nothing_drawn(page, tmp_path):
    assert page.get_attribute("#banner", "role") == "alert"
    for sel in ("#faces-status", "#synth-status", "#announce", PANEL + ".gen-status", "#map-status", "#blend-status"):
        assert page.get_attribute(sel, "role") == "status", sel
    assert page.get_attribute(PANEL + ".gen-progress", "aria-label")
    assert not page.is_hidden("#photo-canvas")
    broken = tmp_path / "broken.png"
    broken.write_bytes(astronaut_png_bytes()[:5000])  # a truncated file
    page.set_input_files("#photo", str(broken))
    page.wait_for_selector("#banner:not([hidden])")
    message = page.inner_text("#banner")
    assert message.startswith("This file is not a complete image we can read") and "the upload" not in message
    assert page.is_hidden("#photo-canvas") and page.locator(".face-chip").count() == 0
    assert page.is_disabled("#synthesize")


def test_a_photo_dropped_anywhere_is_used_and_the_page_stays(page):
    url = page.url
    data = base64.b64encode(astronaut_png_bytes()).decode()
    page.click("#tab-blend")  # a drop on another tab brings the Synthesize tab forward
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        const target = document.querySelector("header");
        for (const type of ["dragover", "drop"])
            target.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", data)
    wait_text(page, "#faces-status", "1 face(s) found in dropped.png")
    assert page.url == url and page.get_attribute("#tab-synth", "aria-selected") == "true"
    assert page.is_enabled("#synthesize") and page.is_hidden("#banner")


def test_no_tab_overflows_a_phone_screen(page):
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        for tab in TABS:
            page.click(f"#tab-{tab}")
            width = page.evaluate("document.documentElement.scrollWidth")
            wide = page.evaluate("""() => [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 391)
                .map(e => e.tagName + '.' + e.className + '#' + e.id + ' ' + Math.round(e.getBoundingClientRect().right)).slice(0, 8)""")
            assert width <= 390, (tab, width, wide)
    finally:
        page.set_viewport_size({"width": 1280, "height": 860})
        page.click("#tab-synth")
    assert page.js_errors == []
