"""Files other tools read: a preview PNG's infotext parses back with an A1111-compatible parser
(``web_helpers.parse_a1111``, written after A1111's ``parse_generation_parameters``) into the
settings it was made with, ``<lora:name:scale>`` names the kohya download and ``Lora hashes``
carries the hash A1111 computes for that file; the page's copy buttons copy exactly that text."""

from __future__ import annotations

import hashlib
import io
import re
import struct
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from server_helpers import astronaut_png_bytes
from web_helpers import browser_context, open_page, parse_a1111, wait_text

PANEL = "#preview-panel "


@pytest.fixture(scope="module")
def context(server, tmp_path_factory):
    with browser_context(tmp_path_factory) as ctx:
        ctx.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
        yield ctx


def a1111_lora_hash(data: bytes) -> str:
    """A1111's hash of a LoRA file (``sd_models``/``hashes``: sha256 of the safetensors data after the header)."""
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


def test_preview_png_infotext_round_trips_and_copy_buttons(context, server, tmp_path):
    page = open_page(context, server)
    photo = tmp_path / "t1.png"
    photo.write_bytes(astronaut_png_bytes())
    page.set_input_files("#photo", str(photo))
    wait_text(page, "#faces-status", "1 face(s) found")
    page.click("#synthesize")
    wait_text(page, "#results .result-title", "t1.png · face 0 · diffusion · seed 0")
    item = httpx.get(server + "/api/loras").json()["loras"][-1]
    page.fill(PANEL + ".prompt", "a photo of sks person, smiling")
    page.fill(PANEL + ".negative", "blurry, lowres")
    page.fill(PANEL + ".scale", "0.8")
    page.fill(PANEL + ".gen-seed", "42")
    page.fill(PANEL + ".steps", "3")
    page.select_option(PANEL + ".scheduler", "euler")
    page.select_option(PANEL + ".size", "64")
    page.click(PANEL + ".generate")
    wait_text(page, PANEL + ".gen-status", "done (3 steps)")
    png = httpx.get(server + page.get_attribute(PANEL + ".preview-img", "src")).content
    with Image.open(io.BytesIO(png)) as im:
        text = im.text["parameters"]
    p = parse_a1111(text)

    # the kohya download: its file stem is the tag's name, its A1111 hash is in "Lora hashes"
    dl = httpx.get(server + item["files"]["kohya"])
    stem = re.search(r'filename="([^"]+)\.safetensors"', dl.headers["content-disposition"]).group(1)
    assert item["a1111_name"] == stem
    assert p["lora_tags"] == [(stem, 0.8)]
    assert p["Prompt"] == f"a photo of sks person, smiling <lora:{stem}:0.8>"
    assert p["lora_hashes"] == {stem: a1111_lora_hash(dl.content)[:12]}
    assert p["Negative prompt"] == "blurry, lowres"
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"], p["Size-1"], p["Size-2"]) == \
        ("3", "Euler", "7.5", "42", "64", "64")
    assert p["Model"] == "base"  # the base folder's name (a single-file checkpoint adds "Model hash")

    # copy parameters = the PNG's infotext; copy <lora> = the tag A1111 reads
    page.click(PANEL + ".copy-params")
    page.wait_for_function("state.lastCopied.length > 0")
    assert page.evaluate("navigator.clipboard.readText()") == text
    page.click("#results .card.result .copy-tag")
    page.wait_for_function("state.lastCopied.startsWith('<lora:')")
    assert page.evaluate("navigator.clipboard.readText()") == f"<lora:{stem}:0.8>"
    wait_text(page, "#announce", "copied")
    assert page.js_errors == []


def test_single_file_checkpoint_gets_a1111_model_hash(tmp_path):
    """``Model hash``: the first 10 digits of the checkpoint file's sha256 (A1111's short hash)."""
    import torch

    from lorasynth.apps.server.backend import Backend
    from lorasynth.core.lora import LoRA, LoRAModule

    ckpt = tmp_path / "my_model.safetensors"
    ckpt.write_bytes(b"not really a checkpoint, but hashed like one" * 100)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = LoRA({name: LoRAModule(torch.ones(2, 320), torch.ones(320, 2), 2.0)})
    stub = SimpleNamespace(cfg=SimpleNamespace(base=str(ckpt)), lora_file=lambda *a: Backend.lora_file(stub, *a),
                           save_formats=["kohya", "diffusers", "peft"])
    fields = Backend.infotext_fields(stub, [("me", lora)])
    assert fields["Model"] == "my_model" and fields["Model hash"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]
    data = Backend.lora_file(stub, lora, "kohya", "me")[0]
    assert fields["Lora hashes"] == f"me: {a1111_lora_hash(data)[:12]}"
