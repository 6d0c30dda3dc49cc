"""The web app in a real browser: Playwright driving Debian's headless Chromium.

One uvicorn server (tiny base + library + model) and one browser per module (``tests/web_helpers.py``).
The browser is the system package (``apt-get install chromium``; ``.ci/run`` installs it when missing):
Playwright's own browser download cannot work offline. The other flows: ``test_web_*.py``.
"""

from __future__ import annotations

import httpx
from PIL import Image

from helpers import max_delta_diff

from server_helpers import load_tiny_lora


def test_photo_to_lora_download_blend_and_preview(page, server, astro_png, tmp_path):
    # ---- photo in: one face found, boxed and preselected; clicking it keeps it chosen
    page.set_input_files("#photo", str(astro_png))
    page.wait_for_function("document.querySelector('#faces-status').textContent.includes('1 face(s) found')")
    box = page.evaluate("state.faces[0].box")
    scale = float(page.get_attribute("#photo-canvas", "data-scale"))
    page.click("#photo-canvas", position={"x": (box[0] + box[2]) / 2 * scale, "y": (box[1] + box[3]) / 2 * scale})
    assert page.get_attribute(".face-chip.selected", "data-index") == "0"

    # ---- synthesize, download, compare with the API's result
    page.select_option("#strategy", "diffusion")
    page.fill("#seed", "3")
    page.click("#synthesize")
    card = page.wait_for_selector(".card.result")
    lora_id = card.get_attribute("data-id")
    assert page.inner_text(".card.result .result-title") == "astronaut.png · face 0 · diffusion · seed 3"
    # provenance: one summary line, the raw JSON one click away
    assert not page.is_visible(".card.result .provenance")
    assert page.inner_text(".card.result summary").startswith("provenance: diffusion · model ")
    page.click(".card.result summary")
    assert "lorasynth.strategy" in page.inner_text(".card.result .provenance")
    with page.expect_download() as dl:
        page.click(".card.result a.download-link")
    downloaded = tmp_path / "from_browser.safetensors"
    dl.value.save_as(downloaded)
    lora = load_tiny_lora(downloaded)
    assert lora.metadata["lorasynth.strategy"] == "diffusion" and lora.metadata["lorasynth.seed"] == "3"
    assert downloaded.read_bytes() == httpx.get(f"{server}/api/loras/{lora_id}?format=kohya").content
    fresh = httpx.post(f"{server}/api/synthesize", files={"image": ("astronaut.png", astro_png.read_bytes())},
                       data={"strategy": "diffusion", "seed": "3"}, timeout=60).json()["loras"][0]
    api_file = tmp_path / "from_api.safetensors"
    api_file.write_bytes(httpx.get(server + fresh["files"]["kohya"]).content)
    assert max_delta_diff(lora, load_tiny_lora(api_file)) == 0

    # ---- preview: the prompt starts as the trigger phrase; live step progress; cancel
    preview = "#preview-panel "
    assert page.input_value(preview + ".prompt") == "a photo of sks person"
    page.fill(preview + ".steps", "100")
    page.select_option(preview + ".size", "256")
    page.click(preview + ".generate")
    page.wait_for_function(f"/^step [1-9]\\d*\\/100 · .*about \\d+ s left$/.test(document.querySelector('{preview}.gen-status').textContent)")
    assert int(page.get_attribute(preview + ".gen-progress", "max")) == 100
    page.click(preview + ".cancel")
    page.wait_for_function(f"document.querySelector('{preview}.gen-status').textContent === 'cancelled'")
    page.fill(preview + ".steps", "3")
    page.select_option(preview + ".size", "64")
    page.click(preview + ".generate")
    page.wait_for_selector(preview + ".preview-img:not([hidden])")
    assert page.inner_text(preview + ".gen-status") == "done (3 steps)"
    assert page.evaluate(f"document.querySelector('{preview}.gen-progress').value") == 3
    src = page.get_attribute(preview + ".preview-img", "src")
    png = tmp_path / "preview.png"
    png.write_bytes(httpx.get(server + src).content)
    with Image.open(png) as im:
        assert "Steps: 3" in im.text["parameters"]

    # ---- library: list, latent map with the synthesized face marked, nearest identities
    page.click("#tab-library")
    page.wait_for_selector("#lib-table tbody tr")
    assert page.locator("#lib-table tbody tr").count() == 20
    page.wait_for_function("document.querySelector('#map-status').textContent.includes('red:')")
    page.set_input_files("#nearest-photo", str(astro_png))
    page.wait_for_selector("#nearest-list li")
    assert page.locator("#nearest-list li").count() == 5
    page.click("#lib-table tbody tr:nth-child(2) .lib-add")

    # ---- blend: the synthesized LoRA + a library entry; move a slider below zero
    page.click("#tab-blend")
    assert page.locator(".blend-item").count() == 2
    slider = page.locator(".blend-item .weight").nth(1)
    before = page.locator(".blend-item .weight-value").nth(1).inner_text()
    slider.focus()
    for _ in range(20):
        page.keyboard.press("ArrowLeft")  # 0.5 - 20 * 0.05 = -0.5
    after = page.locator(".blend-item .weight-value").nth(1).inner_text()
    assert (before, after) == ("0.50", "-0.50")
    page.click("#blend-run")
    page.wait_for_function("document.querySelector('#blend-status').textContent.includes('exact')")
    page.select_option("#blend-mode", "rank")
    page.fill("#blend-rank", "1")
    page.click("#blend-run")
    page.wait_for_function("document.querySelector('#blend-status').textContent.includes('relative error')")
    blended = page.evaluate("state.results[state.results.length - 1]")
    assert blended["report"]["rank"] == 1
    assert '"weights": [1.0, -0.5]' in blended["provenance"]["lorasynth.blend"]
    page.fill("#blend-preview-panel .steps", "2")
    page.select_option("#blend-preview-panel .size", "64")
    page.click("#blend-preview-panel .generate")
    page.wait_for_selector("#blend-preview-panel .preview-img:not([hidden])")

    page.click("#tab-synth")
    shot = tmp_path / "webapp.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    assert not page.locator("#banner:not([hidden])").count(), page.inner_text("#banner")
    assert page.js_errors == []
