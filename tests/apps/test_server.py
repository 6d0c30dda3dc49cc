"""The HTTP API (``lorasynth serve``) through FastAPI's test client, on the tiny model.

One world (tiny base, library, trained model) and one warm backend per module; apps with
other limits share that backend.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import zipfile

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from helpers import max_delta_diff
from lorasynth.core.blending import blend

from lorasynth.apps.server import ServerConfig, create_app
from lorasynth.apps.server.backend import Backend
from lorasynth.synthesis.synthesizer import SynthesisSettings, Synthesizer
from server_helpers import astronaut_png_bytes, load_tiny_lora

REPO = Path(__file__).resolve().parents[2]
#: The test client addresses the server by a name it is bound to (the Host check refuses "testserver").
BASE = "http://127.0.0.1:7860"


@pytest.fixture(scope="module")
def backend(cfg):
    b = Backend(cfg)
    yield b
    b.close()


@pytest.fixture(scope="module")
def client(cfg, backend):
    with TestClient(create_app(cfg, backend), base_url=BASE) as c:  # runs the lifespan: warm-up + generation worker
        yield c


@pytest.fixture(scope="module")
def astro():
    return astronaut_png_bytes()


def upload(data: bytes, name: str = "astronaut.png"):
    return {"image": (name, data, "application/octet-stream")}


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def wait_job(client, job_id: str, timeout: float = 60.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        state = client.get(f"/api/jobs/{job_id}").json()
        if state["state"] in ("done", "error", "cancelled"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {state}")


# ---------------------------------------------------------------------------- page, docs, info
def test_page_static_files_and_offline_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200
    # swagger's assets come from this server, not a CDN
    assert "cdn" not in docs.text.lower() and "/static-offline-docs/swagger-ui-bundle.js" in docs.text
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    schema = client.get("/openapi.json").json()
    for route in ("/api/faces", "/api/synthesize", "/api/blend", "/api/generate", "/api/jobs/{job_id}", "/api/library"):
        assert route in schema["paths"], route
    # no endpoint takes a filesystem path
    names = {p["name"] for ops in schema["paths"].values() for op in ops.values() for p in op.get("parameters", [])}
    assert not {n for n in names if any(w in n.lower() for w in ("path", "file", "dir", "folder"))}, names


def test_info_reports_capabilities(client):
    info = client.get("/api/info").json()
    assert info["embedder"] == "dlib" and info["embed_dim"] == 128
    assert info["has_base"] and info["has_library"] and info["base_is_random_weights"]
    assert "kohya" in info["formats"] and "diffusers" in info["formats"]
    assert info["strategies"] == ["diffusion", "average", "blend", "nearest", "sample"]
    assert info["trigger_prompt"] == "a photo of sks person"


# ---------------------------------------------------------------------------- faces and synthesis
def test_faces_returns_boxes_and_unit_embeddings(client, astro):
    r = client.post("/api/faces", files=upload(astro))
    assert r.status_code == 200
    body = r.json()
    assert (body["width"], body["height"]) == (512, 512) and len(body["faces"]) == 1
    x0, y0, x1, y1 = body["faces"][0]["box"]
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512 and (x1 - x0) > 40
    assert np.linalg.norm(body["faces"][0]["embedding"]) == pytest.approx(1.0, abs=1e-4)


def test_synthesize_from_photo_matches_the_library_and_downloads_in_every_format(client, astro, world, tmp_path):
    r = client.post("/api/synthesize", files=upload(astro), data={"strategy": "diffusion", "seed": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["face"]["faces_found"] == 1 and len(body["loras"]) == 1
    item = body["loras"][0]
    assert item["provenance"]["lorasynth.strategy"] == "diffusion"
    assert item["provenance"]["lorasynth.source"] == "astronaut.png"

    # the same synthesis straight through the library
    face = client.post("/api/faces", files=upload(astro)).json()["faces"][0]
    direct = Synthesizer(world["model"]).synthesize(np.asarray(face["embedding"], np.float32),
                                                    SynthesisSettings(strategy="diffusion", seed=3))[0]
    for fmt, url in item["files"].items():
        got = client.get(url)
        assert got.status_code == 200
        assert f"_{fmt}." in got.headers["content-disposition"]
        if got.headers["content-type"] == "application/zip":  # peft: adapter_config.json + weights, zipped
            path = tmp_path / fmt
            with zipfile.ZipFile(io.BytesIO(got.content)) as z:
                assert sorted(z.namelist()) == ["adapter_config.json", "adapter_model.safetensors"], z.namelist()
                z.extractall(path)
        else:
            path = tmp_path / f"{fmt}.safetensors"
            path.write_bytes(got.content)
        lora = load_tiny_lora(path)
        assert lora.metadata["lorasynth.source_format"] == fmt
        assert max_delta_diff(lora, direct.lora) < 1e-6
    kohya = load_tiny_lora(_save(client, item["files"]["kohya"], tmp_path / "k.safetensors"))
    assert kohya.metadata["lorasynth.model_hash"] == item["provenance"]["lorasynth.model_hash"]


def test_synthesize_can_answer_with_the_file_itself(client, astro, tmp_path):
    r = client.post("/api/synthesize?download=diffusers", files=upload(astro), data={"seed": "3"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    path = tmp_path / "direct.safetensors"
    path.write_bytes(r.content)
    lora = load_tiny_lora(path)
    assert lora.metadata["lorasynth.source_format"] == "diffusers" and lora.metadata["lorasynth.seed"] == "3"
    stored = load_tiny_lora(_save(client, f"/api/loras/{r.headers['x-lorasynth-id']}?format=diffusers", tmp_path / "s.safetensors"))
    assert max_delta_diff(lora, stored) == 0
    bad = client.post("/api/synthesize?download=ckpt", files=upload(astro))
    assert bad.status_code == 400 and "unknown format" in bad.json()["error"]


def _save(client, url, path):
    path.write_bytes(client.get(url).content)
    return path


def test_synthesize_from_embedding_equals_from_photo_and_samples_differ(client, astro, tmp_path):
    face = client.post("/api/faces", files=upload(astro)).json()["faces"][0]
    by_photo = client.post("/api/synthesize", files=upload(astro), data={"seed": "5", "samples": "2"}).json()
    by_emb = client.post("/api/synthesize", data={"embedding": json.dumps(face["embedding"]), "seed": "5",
                                                  "samples": "2"}).json()
    assert by_emb["face"] is None and len(by_photo["loras"]) == len(by_emb["loras"]) == 2
    loras = [load_tiny_lora(_save(client, x["files"]["kohya"], tmp_path / f"{i}.safetensors"))
             for i, x in enumerate(by_photo["loras"] + by_emb["loras"])]
    assert max_delta_diff(loras[0], loras[2]) < 1e-6 and max_delta_diff(loras[1], loras[3]) < 1e-6
    assert max_delta_diff(loras[0], loras[1]) > 1e-4
    for strategy in ("blend", "nearest"):
        r = client.post("/api/synthesize", data={"embedding": json.dumps(face["embedding"]), "strategy": strategy})
        assert r.status_code == 200 and "lorasynth.neighbours" in r.json()["loras"][0]["provenance"]
    assert len(client.get("/api/loras").json()["loras"]) >= 6


# ---------------------------------------------------------------------------- blend
def test_blend_exact_and_rank_r_with_negative_weights(client, astro, backend, tmp_path):
    item = client.post("/api/synthesize", files=upload(astro)).json()["loras"][0]
    synth = load_tiny_lora(_save(client, item["files"]["kohya"], tmp_path / "s.safetensors"))
    _, lib_lora = backend.library.get(3)
    items = [{"source": "result", "id": item["id"], "weight": 0.7}, {"source": "library", "id": "3", "weight": -0.4}]
    exact = client.post("/api/blend", json={"items": items})
    assert exact.status_code == 200, exact.text
    assert exact.json()["report"]["rank"] is None and exact.json()["report"]["overall_relative_error"] == 0
    got = load_tiny_lora(_save(client, exact.json()["files"]["kohya"], tmp_path / "b.safetensors"))
    want, _ = blend([synth, lib_lora], [0.7, -0.4])
    assert max_delta_diff(got, want) < 1e-5
    low = client.post("/api/blend", json={"items": items, "rank": 1}).json()
    assert low["report"]["rank"] == 1 and 0 < low["report"]["overall_relative_error"] < 1
    assert low["provenance"]["lorasynth.blend"]


# ---------------------------------------------------------------------------- generation jobs
def test_generate_reports_progress_and_the_png_carries_its_parameters(client, astro):
    item = client.post("/api/synthesize", files=upload(astro)).json()["loras"][0]
    r = client.post("/api/generate", json={"loras": [{"id": item["id"], "scale": 0.8}], "steps": 3, "width": 64,
                                           "height": 64, "seed": 7, "scheduler": "euler"})
    assert r.status_code == 202, r.text
    state = wait_job(client, r.json()["id"])
    assert state["state"] == "done" and state["step"] == state["total"] == 3
    png = client.get(state["image"])
    assert png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as im:
        assert im.size == (64, 64)
        params = im.text["parameters"]
    assert params.startswith("a photo of sks person") and "Steps: 3" in params and "Seed: 7" in params
    assert item["id"] in params and "Sampler: Euler" in params


def test_queue_is_bounded_and_jobs_cancel(cfg, backend, astro):
    # no `with`: the lifespan does not run, so no worker takes jobs and the queue fills deterministically
    app = create_app(ServerConfig(**{**cfg.__dict__, "queue_size": 2, "warm_up": False}), backend)
    c = TestClient(app, base_url=BASE)
    body = {"steps": 2, "width": 64, "height": 64}
    first, second = (c.post("/api/generate", json=body) for _ in range(2))
    assert first.status_code == second.status_code == 202
    full = c.post("/api/generate", json=body)
    assert full.status_code == 429 and "queue is full" in full.json()["error"]
    cancelled = c.post(f"/api/jobs/{first.json()['id']}/cancel").json()
    assert cancelled["state"] == "cancelled"
    assert c.get(f"/api/jobs/{second.json()['id']}/image").status_code == 409


def test_running_job_stops_at_the_next_step_when_cancelled():
    from lorasynth.apps.server.jobs import JobQueue

    steps = []

    def run(job):
        for i in range(10_000):
            steps.append(i)
            job.progress(i + 1, 10_000)
            time.sleep(0.001)
        return b"png"

    q = JobQueue(run, queue_size=2, keep=8)
    q.start()
    job = q.submit({})
    while q.get(job.id).state != "running" or job.step < 3:
        time.sleep(0.005)
    q.cancel(job.id)
    while q.get(job.id).state == "running":
        time.sleep(0.005)
    assert job.state == "cancelled" and job.png is None and len(steps) < 10_000
    follow = q.submit({})  # the worker survives and takes the next job (then stop() cancels it)
    q.stop()
    assert follow.state in ("cancelled", "queued", "running")


# ---------------------------------------------------------------------------- library
def test_library_list_search_map_and_nearest(client, astro):
    page = client.get("/api/library?limit=5&offset=2").json()
    assert page["total"] == 200 and [e["id"] for e in page["entries"]] == [3, 4, 5, 6, 7]
    assert page["entries"][0]["trainer"] == "planted" and page["entries"][0]["source"] == "synthetic"
    hit = client.get("/api/library?q=id00042").json()
    assert hit["total"] == 1 and hit["entries"][0]["name"] == "planted-id00042"
    assert client.get("/api/library?q=nobody-here").json()["total"] == 0

    item = client.post("/api/synthesize", files=upload(astro)).json()["loras"][0]
    m = client.get(f"/api/library/map?mark={item['id']}").json()
    assert len(m["x"]) == len(m["y"]) == len(m["ids"]) == 160  # training rows (10% test and 10% validation persons held out)
    assert m["marked"]["id"] == item["id"] and all(np.isfinite(m["marked"]["xy"]))
    rank8 = client.post("/api/synthesize", files=upload(astro), data={"strategy": "blend"}).json()["loras"][0]
    off_map = client.get(f"/api/library/map?mark={rank8['id']}").json()
    assert off_map["marked"] is None and "does not fit" in off_map["note"]
    near = client.post("/api/library/nearest", files=upload(astro), data={"k": "3"}).json()
    scores = [n["cosine"] for n in near["neighbours"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert all(n["name"].startswith("planted-") for n in near["neighbours"])


def test_latent_map_points_and_marks_are_one_projection(backend):
    """The map (``lorasynth.synthesis.latent_map``, shared with the demo): a library row marked on the
    map lands on its own point; a capped map is a sorted subset of the same rows, chosen by the seed."""
    from lorasynth.synthesis.latent_map import library_map, project_vectors

    m = backend.latent_map()
    assert m.points.dtype == np.float64 and m.axes.shape == (2, m.mean.shape[0])
    assert m.ids == [backend.syn.pack.ids[r] for r in m.rows]
    raw = backend.syn.pack.read_rows(m.rows[:5])
    np.testing.assert_allclose(project_vectors(backend.syn, m, raw), m.points[:5], rtol=1e-5, atol=1e-5)
    assert backend.project(np.asarray(raw[0])) == pytest.approx(m.points[0].tolist(), rel=1e-5, abs=1e-5)
    small = library_map(backend.syn, max_points=50)
    assert len(small.ids) == 50 and np.all(np.diff(small.rows) > 0) and set(small.rows) <= set(m.rows)
    np.testing.assert_array_equal(library_map(backend.syn, max_points=50).points, small.points)


def test_without_base_or_library_the_features_say_how_to_enable_them(world, backend):
    bare = Backend(ServerConfig(model=str(world["model"])))
    c = TestClient(create_app(ServerConfig(model=str(world["model"]), warm_up=False), bare), base_url=BASE)
    assert c.get("/api/info").json()["has_base"] is False
    r = c.post("/api/generate", json={})
    assert r.status_code == 404 and "--base" in r.json()["error"]
    r = c.get("/api/library")
    assert r.status_code == 404 and "--library" in r.json()["error"]


# ---------------------------------------------------------------------------- bad input -> 4xx JSON
def _bomb_png() -> bytes:
    """A tiny file that declares 10000 x 10000 pixels (100 MP, over the 40 MP limit)."""
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    return buf.getvalue()


BAD_REQUESTS = {
    "not an image": ("post", "/api/faces", {"files": upload(b"hello, not a picture")}, 400),
    "empty upload": ("post", "/api/faces", {"files": upload(b"")}, 400),
    "truncated image": ("post", "/api/faces", {"files": "TRUNCATED"}, 400),
    "decompression bomb": ("post", "/api/faces", {"files": "BOMB"}, 413),
    "no image field": ("post", "/api/faces", {"data": {"x": "1"}}, 422),
    "no face": ("post", "/api/synthesize", {"files": "BLANK"}, 422),
    "face index out of range": ("post", "/api/synthesize", {"files": "ASTRO", "data": {"face_index": "3"}}, 422),
    "negative face index": ("post", "/api/synthesize", {"files": "ASTRO", "data": {"face_index": "-1"}}, 422),
    "neither image nor embedding": ("post", "/api/synthesize", {"data": {"seed": "1"}}, 422),
    "both image and embedding": ("post", "/api/synthesize", {"files": "ASTRO", "data": {"embedding": "[1]"}}, 422),
    "embedding not json": ("post", "/api/synthesize", {"data": {"embedding": "[1, 2"}}, 422),
    "embedding of dicts": ("post", "/api/synthesize", {"data": {"embedding": '[{"a": 1}]'}}, 422),
    "embedding nested": ("post", "/api/synthesize", {"data": {"embedding": "[[1, 2], [3, 4]]"}}, 422),
    "embedding wrong size": ("post", "/api/synthesize", {"data": {"embedding": "[0.1, 0.2]"}}, 400),
    "embedding NaN": ("post", "/api/synthesize", {"data": {"embedding": json.dumps([float("nan")] * 128)}}, 422),
    "unknown strategy": ("post", "/api/synthesize", {"data": {"embedding": "EMB", "strategy": "magic"}}, 400),
    "too many samples": ("post", "/api/synthesize", {"data": {"embedding": "EMB", "samples": "1000"}}, 422),
    "seed not a number": ("post", "/api/synthesize", {"data": {"embedding": "EMB", "seed": "abc"}}, 422),
    "negative guidance": ("post", "/api/synthesize", {"data": {"embedding": "EMB", "guidance": "-1"}}, 422),
    "bad lora id": ("get", "/api/loras/..%2F..%2Fetc", {}, 404),
    "malformed lora id": ("get", "/api/loras/XYZ", {}, 422),
    "unknown lora id": ("get", "/api/loras/0123456789abcdef", {}, 404),
    "unknown format": ("get", "/api/loras/RESULT?format=ckpt", {}, 400),
    "blend nothing": ("post", "/api/blend", {"json": {"items": []}}, 422),
    "blend unknown result": ("post", "/api/blend", {"json": {"items": [{"source": "result", "id": "0123456789abcdef",
                                                                      "weight": 1}]}}, 404),
    "blend unknown library id": ("post", "/api/blend", {"json": {"items": [{"source": "library", "id": "99999",
                                                                          "weight": 1}]}}, 404),
    "blend library name": ("post", "/api/blend", {"json": {"items": [{"source": "library", "id": "../x",
                                                                    "weight": 1}]}}, 422),
    "blend bad source": ("post", "/api/blend", {"json": {"items": [{"source": "disk", "id": "1", "weight": 1}]}}, 422),
    "blend huge weight": ("post", "/api/blend", {"json": {"items": [{"source": "library", "id": "1", "weight": 1e9}]}},
                          422),
    "blend rank 0": ("post", "/api/blend", {"json": {"items": [{"source": "library", "id": "1", "weight": 1}],
                                                     "rank": 0}}, 422),
    "blend not json": ("post", "/api/blend", {"content": b"{oops", "headers": {"content-type": "application/json"}},
                       422),
    "generate too many steps": ("post", "/api/generate", {"json": {"steps": 100000}}, 422),
    "generate too large": ("post", "/api/generate", {"json": {"width": 4096, "height": 64}}, 422),
    "generate odd size": ("post", "/api/generate", {"json": {"width": 65, "height": 64}}, 400),
    "generate unknown scheduler": ("post", "/api/generate", {"json": {"scheduler": "pndm"}}, 400),
    "generate unknown lora": ("post", "/api/generate", {"json": {"loras": [{"id": "0123456789abcdef"}]}}, 404),
    "generate prompt too long": ("post", "/api/generate", {"json": {"prompt": "x" * 5000}}, 422),
    "unknown job": ("get", "/api/jobs/0123456789abcdef", {}, 404),
    "cancel unknown job": ("post", "/api/jobs/0123456789abcdef/cancel", {}, 404),
    "library limit too big": ("get", "/api/library?limit=100000", {}, 422),
    "library negative offset": ("get", "/api/library?offset=-1", {}, 422),
    "map mark malformed": ("get", "/api/library/map?mark=../../x", {}, 422),
    "map mark unknown": ("get", "/api/library/map?mark=0123456789abcdef", {}, 404),
    "nearest k too big": ("post", "/api/library/nearest", {"files": "ASTRO", "data": {"k": "100000"}}, 422),
    "wrong method": ("delete", "/api/faces", {}, 405),
    "unknown endpoint": ("get", "/api/nothing", {}, 404),
}


@pytest.fixture(scope="module")
def bad_inputs(astro, client):
    full = np.asarray(Image.open(io.BytesIO(astro)))
    real = client.post("/api/synthesize", files=upload(astro)).json()["loras"][0]["id"]
    emb = json.dumps([0.1] * 128)
    return {"TRUNCATED": upload(astro[: len(astro) // 3]), "BOMB": upload(_bomb_png()),
            "BLANK": upload(png_bytes(np.full((64, 64, 3), 200, np.uint8))), "ASTRO": upload(png_bytes(full)),
            "RESULT": real, "EMB": emb}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_json_error(client, bad_inputs, case):
    method, url, kwargs, status = BAD_REQUESTS[case]
    kwargs = dict(kwargs)
    url = url.replace("RESULT", bad_inputs["RESULT"])
    if isinstance(kwargs.get("files"), str):
        kwargs["files"] = bad_inputs[kwargs["files"]]
    if "data" in kwargs:
        kwargs["data"] = {k: bad_inputs["EMB"] if v == "EMB" else v for k, v in kwargs["data"].items()}
    r = client.request(method.upper(), url, **kwargs)
    assert r.status_code == status, (case, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"] and "Traceback" not in body["error"]


def test_upload_limits_in_bytes_and_pixels(cfg, backend, astro):
    small = TestClient(create_app(ServerConfig(**{**cfg.__dict__, "max_upload_bytes": 20_000, "max_pixels": 10_000,
                                                 "warm_up": False}), backend), base_url=BASE)
    big = small.post("/api/faces", files=upload(astro))
    assert big.status_code == 413 and "larger than 20000 bytes" in big.json()["error"]
    tiny_png = png_bytes(np.zeros((200, 200, 3), np.uint8))  # 40,000 px > 10,000
    many = small.post("/api/faces", files=upload(tiny_png))
    assert many.status_code == 413 and "exceeds the limit" in many.json()["error"]


def test_a_loopback_server_answers_only_loopback_host_names(client):
    """Exact matching: a bound name and the listening port (more cases: test_server_hardening.py)."""
    assert client.get("/api/info", headers={"host": "localhost:7860"}).status_code == 200
    assert client.get("/api/info", headers={"host": "[::1]:7860"}).status_code == 200
    for host in ("evil.example:7860", "localhost:7860@evil.com", "localhost:evil", "testserver", "localhost:7861"):
        evil = client.get("/api/info", headers={"host": host})
        assert evil.status_code == 400 and "127.0.0.1" in evil.json()["error"], host


# ---------------------------------------------------------------------------- the command
def test_serve_binds_localhost_by_default_and_a_busy_port_is_one_clear_line(world, capsys):
    from lorasynth.apps.cli.main import build_parser, main

    args = build_parser().parse_args(["serve", "--model", str(world["model"])])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(world["model"]), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"port {port}" in err and "already in use" in err


def test_serve_never_downloads_a_hub_base_model(world, monkeypatch, capsys):
    import huggingface_hub

    from lorasynth.apps.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert main(["serve", "--model", str(world["model"]), "--base", "nobody-here/no-model", "--port", "0"]) == 2
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorasynth: error: cannot load base model 'nobody-here/no-model'") and "\n" not in err


def test_ctrl_c_stops_the_server_cleanly(world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lorasynth.apps.cli.main", "serve", "--model", str(world["model"]),
                             "--port", str(port), "--lazy"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "open http://" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        import httpx

        deadline = time.time() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=5).status_code == 200
                break
            except httpx.TransportError:
                assert time.time() < deadline
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err
