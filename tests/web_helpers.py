"""The web app in a real browser: a uvicorn server on the shared test world and Debian's headless
Chromium driven by Playwright (its own browser download cannot work offline).

Each browser test module opens one server and one browser (module-scoped fixtures built from
:func:`running_server` and :func:`browser_context`).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from contextlib import contextmanager

import pytest

from server_helpers import shared_server_world

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@contextmanager
def running_server(tmp_path_factory, **overrides):
    """``http://127.0.0.1:PORT`` of a server on the shared world (tiny base, library, model)."""
    import uvicorn

    from lorasynth.apps.cli.serve import bind_socket
    from lorasynth.apps.server import ServerConfig, create_app

    world = shared_server_world(tmp_path_factory)
    app = create_app(ServerConfig(model=str(world["model"]), base=str(world["base"]), library=str(world["library"]),
                                  **overrides))
    sock = bind_socket("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()


def require_chromium() -> None:
    """Skip visibly without Debian's chromium; fail instead under CI (LORASYNTH_REQUIRE_BROWSER=1)."""
    if not CHROMIUM:
        if os.environ.get("LORASYNTH_REQUIRE_BROWSER") == "1":
            pytest.fail("Debian's chromium is not installed (apt-get install -y chromium)")
        pytest.skip("browser test skipped: Debian's chromium is not installed (apt-get install -y chromium; .ci/run does)")


@contextmanager
def browser_context(tmp_path_factory, **options):
    """A Playwright browser context on Debian's Chromium (headless, downloads accepted)."""
    from playwright.sync_api import sync_playwright

    require_chromium()
    profile = tmp_path_factory.mktemp("chromium_profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS, accept_downloads=True,
            **{"viewport": {"width": 1280, "height": 860}, **options})
        try:
            yield context
        finally:
            context.close()


def open_page(context, url: str):
    """A new page on ``url``, ready (the page sets ``body[data-ready]`` once it has restored the session)."""
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='1']")
    return page


def wait_text(page, selector: str, needle: str) -> None:
    """Wait until the element's text contains ``needle``."""
    page.wait_for_function("([s, n]) => { const e = document.querySelector(s); return e && e.textContent.includes(n); }",
                           arg=[selector, needle])


def parse_a1111(text: str) -> dict:
    """A1111's ``parse_generation_parameters`` (modules/infotext_utils.py), written independently of
    lorasynth's writer: prompt lines, ``Negative prompt:`` lines, then one ``key: value, ...`` line
    (values with ``,:"`` quoted as JSON), ``Size`` split into ``Size-1``/``Size-2``."""
    import json
    import re

    re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    res: dict = {}
    prompt, negative, done_with_prompt = "", "", False
    *lines, lastline = text.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in re_param.findall(lastline):
        if v.startswith('"') and v.endswith('"'):
            v = json.loads(v)
        m = re.match(r"^(\d+)x(\d+)$", v)
        if m:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    # the Lora extension (extensions-builtin/Lora): <lora:name:multiplier> tags and "Lora hashes"
    res["lora_tags"] = [(n, float(s)) for n, s in re.findall(r"<lora:([^:>]+):([^:>]+)>", prompt)]
    hashes = res.get("Lora hashes", "")
    res["lora_hashes"] = dict(tuple(x.strip() for x in item.split(":", 1)) for item in hashes.split(",") if ":" in item)
    return res
