"""Benchmark ``lorasynth serve`` over real HTTP on loopback; prints JSON.

    python scripts/bench_serve.py                 # the demo's model (built or reused from its cache)
    python scripts/bench_serve.py --quick         # the demo's smoke-size model (tiny, faster to build)
    python scripts/bench_serve.py --model M [--base B --library L]

Measures, against a server started as a separate process (``lorasynth serve``):

* 200 synthesize requests (astronaut photo upload -> LoRA, diffusion strategy) at concurrency 8:
  errors, p50 / p95 / max latency, throughput;
* 30 malformed uploads (not images, truncated, empty, decompression bombs, bad fields): all 4xx?
* the server's RSS before and after 500 more requests (synthesize + download + faces).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def demo_paths(quick: bool) -> dict[str, str]:
    from lorasynth.apps.demo import SMOKE, run_demo

    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):  # stdout: JSON only
        s = run_demo(out, SMOKE if quick else None)
    return {"model": s["model"], "base": s["base_model"], "library": s["library"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photo_bytes() -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def malformed_uploads(photo: bytes) -> list[tuple[str, dict]]:
    """30 bad requests, each (name, httpx kwargs for POST /api/faces or /api/synthesize)."""
    from PIL import Image

    def png(img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    rng = np.random.default_rng(0)
    bomb = png(Image.new("1", (12_000, 12_000)))  # 144 MP declared, a few KB on the wire
    gif_bomb = io.BytesIO()
    Image.new("P", (9_000, 9_000)).save(gif_bomb, format="GIF")
    blank = png(Image.new("RGB", (64, 64), "gray"))
    cases = [
        ("random bytes", {"files": {"image": ("x.jpg", rng.bytes(5000))}}),
        ("text", {"files": {"image": ("x.png", b"this is not an image")}}),
        ("empty", {"files": {"image": ("x.png", b"")}}),
        ("jpeg header only", {"files": {"image": ("x.jpg", photo[:20])}}),
        ("truncated jpeg", {"files": {"image": ("x.jpg", photo[: len(photo) // 4])}}),
        ("png bomb", {"files": {"image": ("x.png", bomb)}}),
        ("gif bomb", {"files": {"image": ("x.gif", gif_bomb.getvalue())}}),
        ("png header only", {"files": {"image": ("x.png", bomb[:33])}}),
        ("html", {"files": {"image": ("x.png", b"<html><script>alert(1)</script></html>")}}),
        ("zip", {"files": {"image": ("x.png", b"PK\x03\x04" + rng.bytes(200))}}),
        ("no face", {"files": {"image": ("x.png", blank)}, "url": "/api/synthesize"}),
        ("face index out of range", {"files": {"image": ("x.jpg", photo)}, "data": {"face_index": "7"},
                                     "url": "/api/synthesize"}),
        ("negative face index", {"files": {"image": ("x.jpg", photo)}, "data": {"face_index": "-1"},
                                 "url": "/api/synthesize"}),
        ("missing image", {"data": {"seed": "1"}}),
        ("bad embedding json", {"data": {"embedding": "[1,2"}, "url": "/api/synthesize"}),
        ("embedding wrong size", {"data": {"embedding": "[1,2,3]"}, "url": "/api/synthesize"}),
        ("embedding NaN", {"data": {"embedding": json.dumps(["NaN"] * 4)}, "url": "/api/synthesize"}),
        ("image and embedding", {"files": {"image": ("x.jpg", photo)}, "data": {"embedding": "[1]"},
                                 "url": "/api/synthesize"}),
        ("unknown strategy", {"files": {"image": ("x.jpg", photo)}, "data": {"strategy": "x"}, "url": "/api/synthesize"}),
        ("samples 10^6", {"files": {"image": ("x.jpg", photo)}, "data": {"samples": "1000000"},
                          "url": "/api/synthesize"}),
        ("seed text", {"files": {"image": ("x.jpg", photo)}, "data": {"seed": "abc"}, "url": "/api/synthesize"}),
        ("guidance negative", {"files": {"image": ("x.jpg", photo)}, "data": {"guidance": "-3"},
                               "url": "/api/synthesize"}),
        ("json instead of form", {"json": {"image": "x"}}),
        ("form field as file", {"files": {"other": ("x.jpg", photo)}}),
        ("over the byte limit", {"content": b"0" * 21_000_000, "headers": {"content-type": "multipart/form-data; boundary=x"}}),
        ("broken multipart", {"content": b"--x\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
                              "headers": {"content-type": "multipart/form-data; boundary=x"}}),
        ("no boundary", {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}),
        ("bmp garbage", {"files": {"image": ("x.bmp", b"BM" + rng.bytes(100))}}),
        ("tiff garbage", {"files": {"image": ("x.tif", b"II*\x00" + rng.bytes(100))}}),
        ("webp garbage", {"files": {"image": ("x.webp", b"RIFF\x10\x00\x00\x00WEBPVP8 " + rng.bytes(50))}}),
    ]
    assert len(cases) == 30
    return cases


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--base")
    ap.add_argument("--library")
    ap.add_argument("--quick", action="store_true", help="the demo's smoke-size model instead of the full demo model")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rss-requests", type=int, default=500)
    ap.add_argument("--server-threads", type=int, default=None,
                    help="the server's --threads (1 is faster for synthesis when the cores are busy)")
    args = ap.parse_args()

    import httpx
    import psutil

    paths = {"model": args.model, "base": args.base, "library": args.library} if args.model else demo_paths(args.quick)
    port = free_port()
    cmd = [sys.executable, "-m", "lorasynth.apps.cli.main", "serve", "--port", str(port)]
    for k in ("model", "base", "library"):
        if paths.get(k):
            cmd += [f"--{k}", str(paths[k])]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if args.server_threads:
        cmd += ["--threads", str(args.server_threads)]
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    base_url = f"http://127.0.0.1:{port}"
    result: dict = {"server": {k: str(v) for k, v in paths.items() if v}, "server_threads": args.server_threads}
    try:
        client = httpx.Client(base_url=base_url, timeout=120)
        while True:
            try:
                client.get("/api/info").raise_for_status()
                break
            except httpx.TransportError:
                if server.poll() is not None or time.perf_counter() - t0 > 600:
                    raise SystemExit("server did not start")
                time.sleep(0.2)
        result["startup_s"] = round(time.perf_counter() - t0, 2)
        proc = psutil.Process(server.pid)
        photo = photo_bytes()

        def synth(i: int) -> tuple[bool, float, str | None]:
            t = time.perf_counter()
            r = client.post("/api/synthesize", files={"image": ("astronaut.jpg", photo)}, data={"seed": str(i)})
            ok = r.status_code == 200 and len(r.json()["loras"]) == 1
            return ok, time.perf_counter() - t, r.json()["loras"][0]["id"] if ok else None

        synth(0)  # warm
        t = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            runs = list(pool.map(synth, range(args.requests)))
        wall = time.perf_counter() - t
        lat = [x[1] for x in runs]
        result["synthesize"] = {
            "requests": args.requests, "concurrency": args.concurrency, "errors": sum(not x[0] for x in runs),
            "p50_s": round(percentile(lat, 50), 4), "p95_s": round(percentile(lat, 95), 4),
            "max_s": round(max(lat), 4), "throughput_per_s": round(args.requests / wall, 2),
        }

        statuses = {}
        for name, kw in malformed_uploads(photo):
            kw = dict(kw)
            url = kw.pop("url", "/api/faces")
            try:
                r = client.post(url, **kw)
            except httpx.TransportError as e:
                statuses[name] = f"transport error: {e}"
                continue
            body_ok = r.headers.get("content-type", "").startswith("application/json") and "error" in r.json()
            statuses[name] = r.status_code if body_ok else f"{r.status_code} (no JSON error)"
        result["malformed"] = {"requests": len(statuses),
                               "all_4xx_json": all(isinstance(s, int) and 400 <= s < 500 for s in statuses.values()),
                               "statuses": statuses}

        rss0 = proc.memory_info().rss

        def mixed(i: int) -> bool:
            ok, _, lid = synth(i)
            if not ok:
                return False
            if i % 2 == 0:
                return client.get(f"/api/loras/{lid}?format={'kohya' if i % 4 else 'diffusers'}").status_code == 200
            return client.post("/api/faces", files={"image": ("a.jpg", photo)}).status_code == 200

        with ThreadPoolExecutor(args.concurrency) as pool:
            ok = list(pool.map(mixed, range(args.rss_requests)))
        rss1 = proc.memory_info().rss
        result["rss"] = {"requests": args.rss_requests, "errors": ok.count(False), "before_mb": round(rss0 / 2**20, 1),
                         "after_mb": round(rss1 / 2**20, 1), "growth_mb": round((rss1 - rss0) / 2**20, 1)}
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
