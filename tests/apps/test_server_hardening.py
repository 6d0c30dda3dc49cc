"""The server's second hardening pass (issue 20): what a hostile page or client can no longer do.

* exact Host matching of the bound names, and same-origin state changes (CSRF): a cross-site
  form post is refused before its body is read, and cannot evict the user's results;
* ``/api/blend`` cannot amplify memory: distinct items, a capped count, exact blends capped
  at each module's full rank (losslessly), results kept within a byte budget;
* CPU work runs on a bounded worker pool: ``/api/info`` answers while an upload is being
  decoded or a LoRA synthesized (a deliberately blocked backend, not timing), 503 beyond the queue;
* slow clients: a request head or body that does not arrive in time closes / gets 408;
* the ``embedding`` field and the knobs: hostile JSON and numbers are one 4xx line, with the
  CLI's own rules (``SynthesisSettings.validate``);
* the "peft" download is the adapter folder, zipped, and loads with peft at the right strength.
"""

from __future__ import annotations

import copy
import io
import json
import socket
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from helpers import max_delta_diff
from lorasynth.apps.server import ServerConfig, create_app
from lorasynth.apps.server.backend import Backend
from lorasynth.apps.server.middleware import HostCheck, SameOriginOnly, bound_host_names, normalize_origin
from lorasynth.core.blending import blend
from lorasynth.core.lora import LoRA, LoRAModule
from lorasynth.errors import InputError
from lorasynth.synthesis.synthesizer import SynthesisSettings
from lorasynth.worlds.planted import tiny_layout
from server_helpers import astronaut_png_bytes, load_tiny_lora

BASE = "http://127.0.0.1:7860"
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def backend(cfg):
    b = Backend(cfg)
    b.warm_up()
    yield b
    b.close()


def make_client(cfg, backend, **changes) -> TestClient:
    """A client of an app with ``changes`` to the config (no lifespan: no warm-up, no generation worker)."""
    return TestClient(create_app(ServerConfig(**{**cfg.__dict__, "warm_up": False, **changes}), backend), base_url=BASE)


@pytest.fixture(scope="module")
def client(cfg, backend):
    return make_client(cfg, backend)


@pytest.fixture(scope="module")
def astro():
    return astronaut_png_bytes()


def upload(data: bytes):
    return {"image": ("astronaut.png", data, "application/octet-stream")}


def tiny_lora(rank: int, alpha: float, seed: int) -> LoRA:
    """A random LoRA on the tiny UNet's layout (12 modules of 32 x 32)."""
    g = torch.Generator().manual_seed(seed)
    modules = {s.name: LoRAModule(torch.randn(rank, s.down_shape[1], generator=g) * 0.1,
                                  torch.randn(s.up_shape[0], rank, generator=g) * 0.1, alpha)
               for s in tiny_layout().modules}
    return LoRA(modules, {})


def stored(client, lora: LoRA, label: str = "test") -> str:
    """Put a LoRA in the app's result store (as synthesis would); its id."""
    return client.app.state.ctx.store("synthesized", label, lora, {}).id


def assert_one_line_4xx(r, status: int | tuple = (400, 422)):
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"] and "Traceback" not in body["error"]
    return body["error"]


# ---------------------------------------------------------------------------- Host: exact names, exact port
def scope(host: str | None, port: int | None = 7860, method: str = "GET", **headers) -> dict:
    hs = [] if host is None else [(b"host", host.encode())]
    hs += [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return {"type": "http", "method": method, "scheme": "http", "headers": hs,
            "server": ("127.0.0.1", port) if port else None}


@pytest.mark.parametrize("host,ok", [
    ("127.0.0.1:7860", True), ("localhost:7860", True), ("LOCALHOST:7860", True), ("[::1]:7860", True),
    ("localhost:7860@evil.com", False), ("localhost:evil", False), ("testserver", False), ("localhost", False),
    ("localhost:7861", False), ("evil.example:7860", False), ("127.0.0.1.evil.com:7860", False),
    ("localhost:7860 ", False), ("localhost:07860x", False), ("", False), (None, False), ("[::1]:7860:1", False),
])
def test_a_loopback_bind_answers_only_its_names_on_its_port(host, ok):
    assert (HostCheck(None, bound_host_names("127.0.0.1")).refusal(scope(host)) is None) is ok


def test_host_names_of_other_binds():
    assert HostCheck(None, bound_host_names("192.168.1.5")).refusal(scope("192.168.1.5:7860")) is None
    assert HostCheck(None, bound_host_names("192.168.1.5")).refusal(scope("localhost:7860")) is not None
    wildcard = HostCheck(None, bound_host_names("0.0.0.0"))  # names unknowable: any well-formed one, the right port
    assert wildcard.refusal(scope("myhost.lan:7860")) is None
    assert wildcard.refusal(scope("myhost.lan:7860@evil.com")) is not None and wildcard.refusal(scope("a:1")) is not None
    assert HostCheck(None, bound_host_names("::1")).refusal(scope("[::1]:7860")) is None
    assert HostCheck(None, bound_host_names("127.0.0.1")).refusal(scope("localhost", port=80)) is None


def test_the_app_refuses_a_bad_host_with_one_json_line(client):
    for host in ("localhost:7860@evil.com", "localhost:evil", "testserver"):
        r = client.get("/api/info", headers={"host": host})
        assert "127.0.0.1" in assert_one_line_4xx(r, 400)
    assert TestClient(client.app).get("/api/info").status_code == 400  # the default "testserver" base_url
    assert client.get("/api/info").status_code == 200


# ---------------------------------------------------------------------------- CSRF: same-origin changes only
@pytest.mark.parametrize("headers,ok", [
    ({}, True),  # curl, scripts: no browser headers
    ({"origin": BASE}, True), ({"origin": BASE, "sec_fetch_site": "same-origin"}, True),
    ({"origin": "http://localhost:7860"}, False),  # another origin, even one naming this machine
    ({"origin": EVIL}, False), ({"origin": "null"}, False), ({"origin": EVIL, "sec_fetch_site": "cross-site"}, False),
    ({"sec_fetch_site": "cross-site"}, False), ({"sec_fetch_site": "same-site"}, False),
    ({"origin": BASE, "sec_fetch_site": "cross-site"}, False),
    ({"referer": EVIL + "/page.html"}, False), ({"referer": BASE + "/"}, True),
    ({"origin": "http://localhost:3000"}, False),
])
def test_state_changes_must_come_from_this_origin(headers, ok):
    guard = SameOriginOnly(None)
    assert (guard.refusal(scope("127.0.0.1:7860", method="POST", **headers)) is None) is ok
    allowed = SameOriginOnly(None, frozenset({normalize_origin("http://localhost:3000/")}))
    assert allowed.refusal(scope("127.0.0.1:7860", method="POST", origin="http://localhost:3000")) is None
    assert allowed.refusal(scope("127.0.0.1:7860", method="POST", origin=EVIL)) is not None


def test_allow_origin_values_are_origins():
    assert normalize_origin("HTTP://LocalHost:3000/") == "http://localhost:3000"
    assert normalize_origin("https://example.com:443") == "https://example.com"
    for bad in ("localhost:3000", "ftp://x", "http://u:p@x", "http://x/path", "http://x:99999", "http://x?q=1"):
        with pytest.raises(InputError):
            normalize_origin(bad)


def test_cross_site_posts_are_refused_before_the_body_and_evict_nothing(cfg, backend, astro):
    c = make_client(cfg, backend, keep_results=2)
    mine = stored(c, tiny_lora(2, 2, 0), "mine")
    hostile = [("/api/synthesize", {"files": upload(astro)}), ("/api/faces", {"files": upload(astro)}),
               ("/api/library/nearest", {"files": upload(astro)}), ("/api/synthesize", {"data": {"embedding": "[1]"}}),
               ("/api/blend", {"json": {"items": [{"source": "library", "id": "1", "weight": 1}]}}),
               ("/api/generate", {"json": {}}), ("/api/jobs/0123456789abcdef/cancel", {})]
    for headers in ({"origin": EVIL}, {"sec-fetch-site": "cross-site"}, {"origin": "null"}):
        for url, kwargs in hostile:
            r = c.post(url, headers=headers, **kwargs)
            assert "refused" in assert_one_line_4xx(r, 403), url
    assert c.app.state.results.usage()["items"] == 1 and c.get(f"/api/loras/{mine}").status_code == 200
    # the page's own requests (Origin = this server) and opted-in origins are served
    own = c.post("/api/synthesize", headers={"origin": BASE, "sec-fetch-site": "same-origin"},
                 data={"embedding": json.dumps([0.1] * 128), "strategy": "nearest"})
    assert own.status_code == 200, own.text
    other = make_client(cfg, backend, allow_origins=("http://localhost:3000",))
    r = other.post("/api/synthesize", headers={"origin": "http://localhost:3000"},
                   data={"embedding": json.dumps([0.1] * 128), "strategy": "nearest"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert other.post("/api/faces", headers={"origin": EVIL}, files=upload(astro)).status_code == 403


# ---------------------------------------------------------------------------- /api/blend cannot amplify
def test_blend_refuses_repeats_and_too_many_items(cfg, backend):
    c = make_client(cfg, backend, max_blend_items=3)
    a = stored(c, tiny_lora(2, 2, 1))
    cases = [
        [{"source": "result", "id": a, "weight": 1}, {"source": "result", "id": a, "weight": 0.5}],
        [{"source": "library", "id": "3", "weight": 1}, {"source": "library", "id": "03", "weight": 1}],
        [{"source": "library", "id": str(i), "weight": 1} for i in range(1, 5)],
    ]
    msgs = [assert_one_line_4xx(c.post("/api/blend", json={"items": items}), 422) for items in cases]
    assert "repeats" in msgs[0] and "repeats" in msgs[1] and "at most 3 items" in msgs[2]
    assert c.app.state.results.usage()["items"] == 1
    assert c.get("/api/info").json()["limits"]["blend_items"] == 3


def test_an_exact_blend_is_capped_at_the_full_rank_losslessly(client):
    loras = [tiny_lora(12, 5.0, s) for s in range(4)]  # 4 x rank 12 = 48 > 32 = min(out, in)
    items = [{"source": "result", "id": stored(client, x), "weight": w} for x, w in zip(loras, (0.7, -0.4, 1.3, 0.2))]
    r = client.post("/api/blend", json={"items": items})
    assert r.status_code == 200, r.text
    assert r.json()["report"]["compressed_modules"] == 12
    got = client.app.state.results.get(r.json()["id"]).lora
    assert {m.rank for m in got.modules.values()} == {32}
    want, _ = blend(loras, [0.7, -0.4, 1.3, 0.2])
    assert max_delta_diff(got, want) < 1e-5 * max(m.delta().abs().max().item() for m in want.modules.values()) + 1e-6
    below = client.post("/api/blend", json={"items": items[:2]}).json()  # rank 24 < 32: kept as is
    assert below["report"]["compressed_modules"] == 0
    assert {m.rank for m in client.app.state.results.get(below["id"]).lora.modules.values()} == {24}


def test_results_live_in_a_byte_budget_oldest_dropped(cfg, backend):
    one = tiny_lora(4, 4, 0)
    nbytes = sum(t.numel() * t.element_size() for m in one.modules.values() for t in (m.down, m.up))
    c = make_client(cfg, backend, results_budget_bytes=3 * nbytes)
    ids = [stored(c, tiny_lora(4, 4, s)) for s in range(5)]
    usage = c.get("/api/info").json()["results"]
    assert usage == {"items": 3, "bytes": 3 * nbytes} and c.get("/api/info").json()["limits"]["results_bytes"] == 3 * nbytes
    assert [c.get(f"/api/loras/{i}").status_code for i in ids] == [404, 404, 200, 200, 200]
    # a blend whose result alone is over the budget is refused before it is computed, and evicts nothing
    # (results alone cannot: the store holds them within the budget; 13 rank-1 library LoRAs are 13/12 of it)
    items = [{"source": "library", "id": str(i), "weight": 1} for i in range(1, 14)]
    r = c.post("/api/blend", json={"items": items})
    assert "more than this server keeps" in assert_one_line_4xx(r, 413)
    assert [c.get(f"/api/loras/{i}").status_code for i in ids[2:]] == [200, 200, 200]
    small = c.post("/api/blend", json={"items": items, "rank": 2})
    assert small.status_code == 200 and c.get("/api/info").json()["results"]["bytes"] <= 3 * nbytes
    capped = make_client(cfg, backend, max_blend_input_bytes=nbytes)
    two = [{"source": "result", "id": stored(capped, tiny_lora(4, 4, s)), "weight": 1} for s in (7, 8)]
    assert "blend fewer" in assert_one_line_4xx(capped.post("/api/blend", json={"items": two}), 413)


# ---------------------------------------------------------------------------- CPU work off the event loop
class Gate:
    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()

    def hold(self):
        self.entered.set()
        assert self.release.wait(60)


class BlockedBackend:
    """The real backend, but decoding, synthesis and blending wait until the test releases them."""

    def __init__(self, real: Backend, gate: Gate):
        self.real, self.gate = real, gate

    def __getattr__(self, name):
        return getattr(self.real, name)

    def decode_image(self, *args, **kwargs):
        self.gate.hold()
        return self.real.decode_image(*args, **kwargs)

    def synthesize(self, *args, **kwargs):
        self.gate.hold()
        return self.real.synthesize(*args, **kwargs)

    def blend(self, *args, **kwargs):
        self.gate.hold()
        return self.real.blend(*args, **kwargs)


def in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("route", ["upload", "synthesis", "blend"])
def test_info_answers_while_cpu_work_runs(cfg, backend, astro, route):
    gate = Gate()
    app = create_app(ServerConfig(**{**cfg.__dict__, "warm_up": False}), BlockedBackend(backend, gate))
    with TestClient(app, base_url=BASE) as c:  # one event loop for every request, as under uvicorn
        lib = [{"source": "library", "id": "1", "weight": 0.5}, {"source": "library", "id": "2", "weight": 0.5}]
        slow = {"upload": lambda: c.post("/api/faces", files=upload(astro)),
                "synthesis": lambda: c.post("/api/synthesize", data={"embedding": json.dumps([0.1] * 128)}),
                "blend": lambda: c.post("/api/blend", json={"items": lib})}[route]
        worker, slow_out = in_thread(slow)
        try:
            assert gate.entered.wait(60), "the slow request never reached the backend"
            asker, info = in_thread(lambda: c.get("/api/info"))
            asker.join(30)  # a deadlock guard, not a timing threshold: blocked, it would wait for the release
            assert not asker.is_alive(), f"/api/info waited for the {route} (CPU work on the event loop)"
            assert info[0].status_code == 200
            assert c.get("/api/loras").status_code == 200
        finally:
            gate.release.set()
            worker.join(60)
        assert slow_out and slow_out[0].status_code == 200, slow_out


def test_requests_beyond_the_worker_queue_get_503(cfg, backend):
    gate = Gate()
    app = create_app(ServerConfig(**{**cfg.__dict__, "warm_up": False, "workers": 1, "cpu_queue": 0}),
                     BlockedBackend(backend, gate))
    with TestClient(app, base_url=BASE) as c:
        body = {"embedding": json.dumps([0.1] * 128)}
        worker, first = in_thread(lambda: c.post("/api/synthesize", data=body))
        try:
            assert gate.entered.wait(60)
            assert "busy" in assert_one_line_4xx(c.post("/api/synthesize", data=body), 503)
        finally:
            gate.release.set()
            worker.join(60)
        assert first[0].status_code == 200


# ---------------------------------------------------------------------------- slow clients (a real server)
@pytest.fixture(scope="module")
def live(cfg, backend):
    import uvicorn

    from lorasynth.apps.cli.serve import bind_socket, uvicorn_config

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app_cfg = ServerConfig(**{**cfg.__dict__, "warm_up": False, "port": port, "header_timeout": 0.5, "body_timeout": 0.5})
    srv = uvicorn.Server(uvicorn_config(create_app(app_cfg, backend), app_cfg))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline
        time.sleep(0.05)
    yield port
    srv.should_exit = True
    thread.join(30)
    sock.close()


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a 30 s guard against a hang)."""
    sock.settimeout(30)
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_slow_request_heads_are_closed(live):
    host = f"127.0.0.1:{live}"
    with socket.create_connection(("127.0.0.1", live)) as s:  # a head that never ends
        s.sendall(f"GET /api/info HTTP/1.1\r\nHost: {host}\r\nX-Slow: 1".encode())
        assert read_all(s) == b""
    with socket.create_connection(("127.0.0.1", live)) as s:  # an idle connection
        assert read_all(s) == b""
    with socket.create_connection(("127.0.0.1", live)) as s:  # a prompt client is served
        s.sendall(f"GET /api/info HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert read_all(s).startswith(b"HTTP/1.1 200")


def test_slow_bodies_get_408(live):
    host = f"127.0.0.1:{live}"
    with socket.create_connection(("127.0.0.1", live)) as s:  # a body that never ends
        s.sendall(f"POST /api/faces HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
                  f"Content-Length: 5000\r\n\r\n--xx\r\n".encode())
        answer = read_all(s)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    assert "not received within 0.5 s" in json.loads(body)["error"]


# ---------------------------------------------------------------------------- the embedding field and the knobs
HOSTILE_EMBEDDINGS = {
    "99k-deep nesting": "[" * 99_000 + "]" * 99_000,
    "401-digit number": "[" + ", ".join(["1" * 401] + ["0.1"] * 127) + "]",
    "JSON booleans": json.dumps([True, False] * 64),
    "strings": json.dumps(["0.1"] * 128),
    "1e400": "[" + ", ".join(["1e400"] + ["0.1"] * 127) + "]",
    "NaN": "[" + ", ".join(["NaN"] + ["0.1"] * 127) + "]",
    "an object": json.dumps({"a": [0.1] * 128}),
    "nested lists": json.dumps([[0.1] * 128]),
    "null": "null",
    "duplicate keys": '{"a": 1, "a": 2}',
    "not JSON": "[0.1, 0.2",
    "empty": "[]",
    "lone surrogate": '["\\ud800"]',
}


@pytest.mark.parametrize("case", list(HOSTILE_EMBEDDINGS))
def test_hostile_embeddings_are_one_4xx_line(client, case):
    r = client.post("/api/synthesize", data={"embedding": HOSTILE_EMBEDDINGS[case], "strategy": "nearest"})
    assert_one_line_4xx(r, (400, 413, 422))


KNOBS = [("guidance", -1), ("guidance", float("nan")), ("guidance", float("inf")), ("guidance", 51), ("guidance", 0),
         ("guidance", 50), ("steps", 0), ("steps", 1001), ("steps", 1), ("seed", -1), ("seed", 2**63),
         ("seed", 2**63 - 1), ("samples", 0), ("samples", 2)]


@pytest.mark.parametrize("knob,value", KNOBS, ids=[f"{k}={v}" for k, v in KNOBS])
def test_knobs_follow_the_clis_rules(client, knob, value):
    """The server refuses a knob exactly when ``SynthesisSettings.validate`` (the CLI's rule) does."""
    try:
        SynthesisSettings(**{knob: value}).validate()
        cli_ok = True
    except Exception:  # whatever the CLI's rule raises, the CLI refuses the value
        cli_ok = False
    form = {"embedding": json.dumps([0.1] * 128), "strategy": "diffusion", "steps": "2"}
    r = client.post("/api/synthesize", data={**form, knob: str(value)})
    if cli_ok:
        assert r.status_code == 200, r.text
    else:
        assert_one_line_4xx(r)


@pytest.mark.parametrize("entry_id", ["²", "³", "١٢", str(2**63), "1" * 401, "-1", " 7", "1_0"])
def test_hostile_library_ids_are_one_4xx_line(client, entry_id):
    r = client.post("/api/blend", json={"items": [{"source": "library", "id": entry_id[:32], "weight": 1}]})
    assert_one_line_4xx(r, 422)


@pytest.mark.parametrize("weight", ["NaN", "Infinity", "-Infinity", "1e308", "true"])
def test_non_finite_blend_weights_are_one_4xx_line(client, weight):
    body = '{"items": [{"source": "library", "id": "1", "weight": %s}]}' % weight
    assert_one_line_4xx(client.post("/api/blend", content=body, headers={"content-type": "application/json"}), 422)


# ---------------------------------------------------------------------------- the peft download
def test_the_peft_download_is_the_adapter_folder_and_loads_at_full_strength(client, backend, tmp_path):
    """A LoRA with alpha 27 != rank 4: the zip's adapter_config.json carries the alpha, so peft's
    ``PeftModel.from_pretrained`` and lorasynth both rebuild the kohya file's exact ΔW."""
    from peft import PeftModel

    lora_id = stored(client, tiny_lora(4, 27.0, 3), "alpha27")
    r = client.get(f"/api/loras/{lora_id}?format=peft")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"].endswith('_peft.zip"')
    folder = tmp_path / "adapter"
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert sorted(z.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
        z.extractall(folder)
    (tmp_path / "kohya.safetensors").write_bytes(client.get(f"/api/loras/{lora_id}?format=kohya").content)
    kohya = load_tiny_lora(tmp_path / "kohya.safetensors")
    assert max_delta_diff(load_tiny_lora(folder), kohya) < 1e-6
    # the CLI writes the same two files for the same LoRA
    from lorasynth.formats import save_lora

    save_lora(client.app.state.results.get(lora_id).lora, tmp_path / "cli", "peft")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "cli" / name).read_bytes() == (folder / name).read_bytes(), name

    unet = copy.deepcopy(backend.pipe.unet).float()  # the pipeline may run in bf16: compare in fp32
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    merged = PeftModel.from_pretrained(unet, str(folder)).merge_and_unload()
    after = dict(merged.named_parameters())
    for name, m in kohya.modules.items():
        key = name.removeprefix("unet.") + ".weight"
        np.testing.assert_allclose((after[key] - before[key]).detach().numpy(), m.delta().numpy(), atol=1e-5)


@pytest.mark.parametrize("args", [["--max-upload-mb", "nan"], ["--max-upload-mb", "-1"], ["--max-upload-mb", "inf"],
                                  ["--allow-origin", "localhost:3000"], ["--port", "70000"], ["--workers", "0"],
                                  ["--queue", "-1"], ["--body-timeout", "0"], ["--results-mb", "nan"]])
def test_serve_refuses_bad_options_with_one_line(world, args, capsys):
    from lorasynth.apps.cli.main import main

    try:
        code = main(["serve", "--model", str(world["model"]), *args])
    except SystemExit as e:  # argparse's own error exit
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("lorasynth: error:") and "\n" not in err and "Traceback" not in err, err
