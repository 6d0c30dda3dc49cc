"""The web app as a session in a real browser: the whole mission on the page (every strategy with
its one sentence, negative prompt, random seed, base-vs-LoRA with the same seed, interpolation),
a gallery that keeps every preview, labels a person can read, and a session that survives a
reload, including a reload in the middle of a preview (the page re-attaches and can cancel)."""

from __future__ import annotations

import io

import httpx
from PIL import Image

from web_helpers import parse_a1111, wait_text

PANEL = "#preview-panel "


def post_from_page(page, path: str, body: dict) -> dict:
    """POST JSON from the page itself (same origin, the headers a browser sends)."""
    return page.evaluate("""async ([path, body]) => {
        const r = await fetch(path, {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body)});
        return await r.json(); }""", [path, body])


def reload(page) -> None:
    page.reload()
    page.wait_for_selector("body[data-ready='1']")


def test_every_strategy_with_its_sentence_sample_needs_no_photo(page):
    options = page.eval_on_selector_all("#strategy option", "os => os.map(o => o.value)")
    assert options == ["diffusion", "average", "blend", "nearest", "sample"]
    sentences = set()
    for name in options:
        page.select_option("#strategy", name)
        sentences.add(page.inner_text("#strategy-help"))
    assert len(sentences) == 5 and all(len(s) > 30 for s in sentences)
    # sample: a new identity, no photo; the random seed button picks the seed
    assert page.is_disabled("#synthesize") is False
    before = page.input_value("#seed")
    page.click("#seed-random")
    seed = page.input_value("#seed")
    assert seed != before and int(seed) >= 0
    page.click("#synthesize")
    wait_text(page, "#results .result-title", "sample")
    assert page.inner_text("#results .result-title") == f"new identity · sample · seed {seed}"
    page.select_option("#strategy", "diffusion")
    assert page.is_disabled("#synthesize")  # diffusion needs a face


def test_labels_average_compare_negative_prompt_and_gallery(page, server, astro_png):
    page.set_input_files("#photo", str(astro_png))
    wait_text(page, "#faces-status", "1 face(s) found")
    page.select_option("#strategy", "average")
    page.fill("#seed", "7")
    page.click("#synthesize")
    wait_text(page, "#results .result-title", "average")
    assert page.inner_text("#results .result-title") == "astronaut.png · face 0 · average · seed 7"
    assert page.evaluate("document.activeElement.className") == "result-title"  # focus on what appeared
    assert "(average)" in page.inner_text("#results .card summary")
    # base vs LoRA, same seed, with a negative prompt: two images side by side
    page.fill(PANEL + ".negative", "blurry")
    page.fill(PANEL + ".gen-seed", "11")
    page.fill(PANEL + ".steps", "2")
    page.select_option(PANEL + ".size", "64")
    page.check(PANEL + ".compare")
    page.click(PANEL + ".generate")
    wait_text(page, PANEL + ".gen-status", "done (2 steps)")
    images = page.locator(PANEL + ".latest .preview-img")
    assert images.count() == 2
    params = []
    for i in range(2):
        png = httpx.get(server + images.nth(i).get_attribute("src")).content
        with Image.open(io.BytesIO(png)) as im:
            params.append(parse_a1111(im.text["parameters"]))
    base, lora = params
    assert base["Seed"] == lora["Seed"] == "11" and base["Negative prompt"] == lora["Negative prompt"] == "blurry"
    assert base["lora_tags"] == [] and len(lora["lora_tags"]) == 1
    boxes = [page.locator(PANEL + ".latest figure").nth(i).bounding_box() for i in range(2)]
    assert abs(boxes[0]["y"] - boxes[1]["y"]) < 1 and boxes[1]["x"] > boxes[0]["x"]  # side by side
    # a second preview does not replace the first: the gallery keeps both, newest first
    page.uncheck(PANEL + ".compare")
    page.fill(PANEL + ".gen-seed", "12")
    page.click(PANEL + ".generate")
    wait_text(page, PANEL + ".gen-status", "done (2 steps)")
    page.click("#tab-gallery")
    page.wait_for_function("document.querySelectorAll('#gallery-items .preview-img').length === 3")
    groups = page.locator("#gallery-items > div")
    assert groups.count() == 2
    assert "seed 12" in groups.nth(0).inner_text()
    assert groups.nth(1).get_attribute("class") == "pair" and groups.nth(1).locator("figure").count() == 2
    assert "base model, no LoRA" in groups.nth(1).inner_text()
    assert "astronaut.png · face 0 · average · seed 7 × 1" in groups.nth(1).inner_text()
    assert "2 steps · 64×64" in groups.nth(0).inner_text()
    page.click("#tab-synth")


def test_session_survives_a_reload(page, server):
    loras = httpx.get(server + "/api/loras").json()["loras"]
    jobs = httpx.get(server + "/api/jobs").json()["jobs"]
    reload(page)
    assert page.locator("#results .card.result").count() == len(loras) >= 2
    assert page.inner_text("#results .result-title") == loras[-1]["label"]  # newest first
    wait_text(page, "#synth-status", "restored")
    done = [j for j in jobs if j["state"] == "done"]
    assert page.locator("#gallery-items .preview-img").count() == len(done) == 3
    # the preview panel is ready for the newest LoRA
    assert loras[-1]["label"] in page.inner_text(PANEL + ".lora-name")
    assert page.is_enabled(PANEL + ".generate")


def test_reload_in_the_middle_of_a_preview_reattaches_and_cancels(page, server):
    page.fill(PANEL + ".steps", "100")
    page.select_option(PANEL + ".size", "256")
    page.click(PANEL + ".generate")
    page.wait_for_function(f"/^step [1-9]\\d*\\/100/.test(document.querySelector('{PANEL}.gen-status').textContent)")
    job_id = page.get_attribute(PANEL + ".latest figure", "data-job")
    reload(page)
    # the same job, still running, followed live on the new page; its cancel button works
    page.wait_for_function(f"/^step [1-9]\\d*\\/100 · .*s left$/.test(document.querySelector('{PANEL}.gen-status').textContent)")
    assert page.get_attribute(PANEL + ".latest figure", "data-job") == job_id
    assert page.is_enabled(PANEL + ".cancel") and page.is_disabled(PANEL + ".generate")
    page.click(PANEL + ".cancel")
    wait_text(page, PANEL + ".gen-status", "cancelled")
    assert httpx.get(f"{server}/api/jobs/{job_id}").json()["state"] == "cancelled"
    # the queue is free again: a short preview finishes at once
    page.fill(PANEL + ".steps", "2")
    page.select_option(PANEL + ".size", "64")
    page.click(PANEL + ".generate")
    wait_text(page, PANEL + ".gen-status", "done (2 steps)")


def test_queue_position_and_eta(page, server):
    lora_id = httpx.get(server + "/api/loras").json()["loras"][-1]["id"]
    blocker = post_from_page(page, "/api/generate", {"loras": [], "steps": 100, "width": 256, "height": 256})
    page.fill(PANEL + ".steps", "2")
    page.select_option(PANEL + ".size", "64")
    page.click(PANEL + ".generate")
    wait_text(page, PANEL + ".gen-status", "queued · 1 ahead · starts in about")
    listing = httpx.get(server + "/api/jobs").json()
    assert listing["measured"] is True and listing["seconds_per_step_megapixel"] > 0
    open_jobs = {j["id"]: j for j in listing["jobs"] if j["state"] in ("queued", "running")}
    assert open_jobs[blocker["id"]]["position"] == 0
    mine = [j for j in open_jobs.values() if j["id"] != blocker["id"]][0]
    assert mine["position"] == 1 and mine["eta_s"] > open_jobs[blocker["id"]]["eta_s"] > 0
    post_from_page(page, f"/api/jobs/{blocker['id']}/cancel", {})
    wait_text(page, PANEL + ".gen-status", "done (2 steps)")
    assert lora_id


def test_interpolate_between_two_results_and_map_says_what_it_shows(page, server):
    page.click("#tab-blend")
    assert page.is_enabled("#interp-run")
    a, b = page.input_value("#interp-a"), page.input_value("#interp-b")
    assert a != b
    page.fill("#interp-t", "0.25")
    page.dispatch_event("#interp-t", "input")
    assert page.inner_text("#interp-t-value") == "0.25"
    page.click("#interp-run")
    wait_text(page, "#blend-status", "exact")
    blended = httpx.get(server + "/api/loras").json()["loras"][-1]
    assert blended["kind"] == "blended" and '"weights": [0.75, 0.25]' in blended["provenance"]["lorasynth.blend"]
    assert page.evaluate("document.activeElement.className") == "blend-title"
    page.click("#tab-library")
    wait_text(page, "#map-status", "training rows only")
    text = page.inner_text("#map-status")
    n_map = len(httpx.get(server + "/api/library/map").json()["ids"])
    total = httpx.get(server + "/api/library").json()["total"]
    assert text.startswith(f"{n_map} LoRAs the model was trained on of the library's {total} entries")
    assert n_map < total
    page.click("#tab-synth")
    assert page.js_errors == []


def test_edit_along_a_library_attribute(page, server, tmp_path):
    from helpers import max_delta_diff
    from server_helpers import load_tiny_lora

    assert httpx.get(server + "/api/attributes").json()["attributes"] == ["Smiling"]
    assert page.is_visible("#edit-box")
    source = page.input_value("#edit-from")
    loras = httpx.get(server + "/api/loras").json()["loras"]
    editable = [x["id"] for x in loras if x["editable"]]
    assert source == editable[-1] and len(editable) < len(loras)  # blends and averages are off the latent space
    page.select_option("#edit-attr", "Smiling")
    page.fill("#edit-strength", "-1")
    page.dispatch_event("#edit-strength", "input")
    assert page.inner_text("#edit-strength-value") == "-1.00"
    page.click("#edit-run")
    wait_text(page, "#synth-status", "edited:")
    edited = httpx.get(server + "/api/loras").json()["loras"][-1]
    assert edited["kind"] == "edited" and edited["label"].endswith(" · Smiling -1σ")
    assert page.inner_text("#results .result-title") == edited["label"]
    assert page.evaluate("document.activeElement.className") == "result-title"
    assert '"attribute": "Smiling", "strength": -1.0' in edited["provenance"]["lorasynth.edit"]
    files = {}
    for key, lora_id in (("source", source), ("edited", edited["id"])):
        files[key] = tmp_path / f"{key}.safetensors"
        files[key].write_bytes(httpx.get(f"{server}/api/loras/{lora_id}?format=kohya").content)
    assert max_delta_diff(load_tiny_lora(files["source"]), load_tiny_lora(files["edited"])) > 0
    # the strength moves it: 0 and +1 differ from -1 and from each other
    for strength in (0.0, 1.0):
        other = post_from_page(page, "/api/edit", {"id": source, "attribute": "Smiling", "strength": strength})
        files[strength] = tmp_path / f"{strength}.safetensors"
        files[strength].write_bytes(httpx.get(f"{server}/api/loras/{other['id']}?format=kohya").content)
    lo, zero, hi = (load_tiny_lora(files[k]) for k in ("edited", 0.0, 1.0))
    assert max_delta_diff(lo, zero) > 0 and max_delta_diff(zero, hi) > 0 and max_delta_diff(lo, hi) > 0
    assert page.js_errors == []


def test_back_from_another_page_restores_the_session_and_the_file_box_agrees(page, server, astro_png):
    page.click("#tab-synth")
    page.set_input_files("#photo", str(astro_png))
    wait_text(page, "#faces-status", "1 face(s) found")
    page.goto(server + "/docs")
    page.go_back()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#results .card.result").count() == len(httpx.get(server + "/api/loras").json()["loras"])
    page.wait_for_function("document.querySelector('#photo').files.length === 0 || state.faces.length === 1")
    kept = page.evaluate("document.querySelector('#photo').files.length")
    page.select_option("#strategy", "diffusion")
    assert page.is_enabled("#synthesize") == (kept == 1)  # a file shown is a file in use
    assert page.js_errors == []
