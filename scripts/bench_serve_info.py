"""Is ``/api/info`` answered while large uploads are decoded and searched for faces? Prints JSON.

    python scripts/bench_serve_info.py                       # the tests' tiny world (built in a temp folder)
    python scripts/bench_serve_info.py --model M [--base B --library L]

Starts ``lorasynth serve`` as a separate process, measures ``/api/info`` latency idle, then
again while ``--clients`` threads keep uploading a ``--megapixels`` JPEG to ``/api/faces``
(decoding + face detection, the CPU work issue 20 moved off the event loop). Reports p50 / p95 /
max of both, the uploads served and the wall time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def big_jpeg(megapixels: float) -> bytes:
    """The astronaut photo tiled up to ``megapixels`` (a real face, a large decode)."""
    from PIL import Image
    from skimage import data

    tile = data.astronaut()
    side = int((megapixels * 1e6) ** 0.5)
    reps = -(-side // tile.shape[0])
    img = np.tile(tile, (reps, reps, 1))[:side, :side]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def percentiles(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1000
    return {"n": len(xs), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p95_ms": round(float(np.percentile(a, 95)), 1), "max_ms": round(float(a.max()), 1)}


def probe(url: str, seconds: float) -> list[float]:
    import httpx

    out, end = [], time.time() + seconds
    with httpx.Client(timeout=60) as c:
        while time.time() < end:
            t = time.perf_counter()
            assert c.get(url).status_code == 200
            out.append(time.perf_counter() - t)
            time.sleep(0.05)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model"), ap.add_argument("--base"), ap.add_argument("--library")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--megapixels", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    if args.model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from server_helpers import build_server_world

        world = build_server_world(Path(tmp.name) / "world")
        args.model, args.base, args.library = (str(world[k]) for k in ("model", "base", "library"))
    port = free_port()
    cmd = [sys.executable, "-m", "lorasynth.apps.cli.main", "serve", "--model", args.model, "--port", str(port)]
    cmd += ["--base", args.base] if args.base else []
    cmd += ["--library", args.library] if args.library else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    import httpx

    try:
        while "open http://" not in (line := proc.stdout.readline()):
            assert line or proc.poll() is None, "the server did not start"
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                httpx.get(base + "/api/info", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        idle = probe(base + "/api/info", 5)
        photo = big_jpeg(args.megapixels)
        stop, served, statuses = threading.Event(), [], []

        def upload():
            with httpx.Client(timeout=600) as c:
                while not stop.is_set():
                    r = c.post(base + "/api/faces", files={"image": ("big.jpg", photo, "image/jpeg")})
                    statuses.append(r.status_code)
                    served.append(1)

        threads = [threading.Thread(target=upload, daemon=True) for _ in range(args.clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        time.sleep(1.0)  # the uploads are in
        loaded = probe(base + "/api/info", args.seconds)
        stop.set()
        for t in threads:
            t.join(600)
        print(json.dumps({
            "upload_bytes": len(photo), "megapixels": args.megapixels, "clients": args.clients,
            "uploads_answered": len(served), "upload_statuses": sorted(set(statuses)),
            "wall_s": round(time.time() - t0, 1), "info_idle": percentiles(idle), "info_under_load": percentiles(loaded),
            "cpus": os.cpu_count(),
        }, indent=2))
    finally:
        proc.terminate()
        proc.wait(30)
        tmp.cleanup()


if __name__ == "__main__":
    main()
