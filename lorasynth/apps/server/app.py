"""The FastAPI app: the static page, the JSON/HTTP API and its error contract.

Contract: every bad input gets a 4xx with ``{"error": "..."}``; an unexpected failure gets
``500 {"error": "internal error ..."}`` (logged, no traceback sent). No route takes a
filesystem path: files go in as uploads and come out as response bodies.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Literal

import numpy as np
from fastapi import Body, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorasynth import __version__
from lorasynth.errors import FaceError, ImageError, LibraryError, LorasynthError, ModelError
from lorasynth.apps.server.backend import Backend
from lorasynth.apps.server.config import ServerConfig
from lorasynth.apps.server.jobs import JobQueue, QueueFull
from lorasynth.apps.server.results import ResultStore

log = logging.getLogger("lorasynth.apps.server")

ID = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$", description="id returned by the API")]
STATIC = resources.files("lorasynth.apps.server") / "static"


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------- request bodies
class BlendItem(BaseModel):
    source: Literal["result", "library"] = Field(description="'result': a LoRA this server made; 'library': an entry")
    id: str = Field(max_length=32, description="result id, or library entry id")
    weight: float = Field(ge=-10, le=10)


class BlendRequest(BaseModel):
    items: list[BlendItem] = Field(min_length=1)
    rank: int | None = Field(default=None, ge=1, le=1024, description="None: exact sum; r: best rank-r approximation")


class GenLoRA(BaseModel):
    id: str = Field(pattern=r"^[0-9a-f]{16}$")
    scale: float = Field(default=1.0, ge=-10, le=10)


class GenerateRequest(BaseModel):
    loras: list[GenLoRA] = Field(default_factory=list, max_length=8)
    prompt: str = Field(default="a photo of sks person", max_length=1000)
    negative_prompt: str = Field(default="", max_length=1000)
    scheduler: str = "dpm"
    steps: int = Field(default=20, ge=1)
    guidance: float = Field(default=7.5, ge=0, le=30)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    width: int = Field(default=512, ge=8)
    height: int = Field(default=512, ge=8)


# ---------------------------------------------------------------------------- the app
def create_app(cfg: ServerConfig, backend: Backend | None = None) -> FastAPIOffline:
    """The app for ``cfg``; ``backend`` may be given (tests share one across apps)."""
    backend = backend or Backend(cfg)
    results = ResultStore(cfg.keep_results)
    jobs = JobQueue(lambda job: _run_job(job), cfg.queue_size, cfg.keep_jobs)

    @asynccontextmanager
    async def lifespan(app):
        if cfg.warm_up:
            backend.warm_up()
        jobs.start()
        try:
            yield
        finally:
            jobs.stop()

    app = FastAPIOffline(
        title="lorasynth", version=__version__, lifespan=lifespan,
        description="Photo in, LoRA out: face detection, zero-shot LoRA synthesis, blending, previews, library. "
                    "Every error is a JSON body {\"error\": ...}.",
    )
    app.state.backend, app.state.results, app.state.jobs = backend, results, jobs
    app.add_middleware(_BodyLimit, limit=cfg.max_upload_bytes)
    if cfg.host in LOOPBACK:
        app.add_middleware(_LoopbackHostOnly)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    # ------------------------------------------------------------ errors -> {"error": ...}
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(LorasynthError)
    async def _lorasynth_error(request, exc: LorasynthError):
        status = 404 if isinstance(exc, LibraryError) and str(exc).startswith("no ") else 400
        if isinstance(exc, ImageError) and ("refused" in str(exc) or "too large" in str(exc)):
            status = 413
        if isinstance(exc, FaceError):
            status = 422
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "form"))
            parts.append(f"{where or 'request'}: {e.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    # ------------------------------------------------------------ helpers
    async def read_upload(image: UploadFile) -> np.ndarray:
        data = await image.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            raise ApiError(413, f"upload larger than {cfg.max_upload_bytes} bytes")
        return backend.decode_image(data, cfg.max_pixels)

    def stored(item_id: str):
        item = results.get(item_id)
        if item is None:
            raise ApiError(404, f"no LoRA {item_id} on this server (results are kept in memory; the oldest are dropped)")
        return item

    def _run_job(job) -> bytes:
        p = job.params
        loras = [(stored(x["id"]).lora, x["scale"]) for x in p["loras"]]
        settings = backend.generation_settings(**{k: p[k] for k in (
            "prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height", "scheduler")})
        extra = {"Model": backend.describe()["model"], "Lora": json.dumps([[x["id"], x["scale"]] for x in p["loras"]])}
        return backend.generate_png(loras, settings, extra, job.progress)

    # ------------------------------------------------------------ page
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    # ------------------------------------------------------------ API
    @app.get("/api/info", tags=["server"], summary="What this server can do (model, formats, limits)")
    def info():
        return {"version": __version__, **backend.describe(), "jobs": jobs.counts()}

    @app.post("/api/faces", tags=["faces"], summary="Detect faces: image -> boxes + embeddings (largest first)")
    async def faces(image: Annotated[UploadFile, File(description="a photo (JPEG, PNG, WebP...)")]):
        rgb = await read_upload(image)
        found = backend.detect_faces(rgb)
        return {"width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "embedder": backend.info.embedder,
                "faces": [f.__dict__ for f in found]}

    @app.post("/api/synthesize", tags=["synthesis"],
              summary="Synthesize LoRAs from a photo (image + face_index) or an embedding (JSON list)")
    async def synthesize(
        image: Annotated[UploadFile | None, File(description="a photo; or send `embedding`")] = None,
        embedding: Annotated[str | None, Form(max_length=200_000, description="JSON list of floats")] = None,
        face_index: Annotated[int, Form(ge=0, le=1000)] = 0,
        strategy: Annotated[str, Form()] = "diffusion",
        guidance: Annotated[float | None, Form(ge=0, le=50)] = None,
        steps: Annotated[int | None, Form(ge=1, le=1000)] = None,
        seed: Annotated[int, Form(ge=0, le=2**63 - 1)] = 0,
        samples: Annotated[int, Form(ge=1)] = 1,
        download: Annotated[str | None, Query(max_length=20, description="a format: answer with the LoRA file itself "
                                              "(provenance in its metadata) instead of JSON")] = None,
    ):
        if samples > cfg.max_samples:
            raise ApiError(422, f"samples must be <= {cfg.max_samples}")
        face = None
        if (image is None) == (embedding is None):
            raise ApiError(422, "send exactly one of `image` (a photo) or `embedding` (a JSON list of floats)")
        if image is not None:
            rgb = await read_upload(image)
            vec, face_info, n_faces = backend.face_embedding(rgb, face_index)
            face = {"index": face_info.index, "box": face_info.box, "faces_found": n_faces}
            source = (image.filename or "upload")[-100:]
        else:
            try:
                values = json.loads(embedding)
                vec = np.asarray(values, dtype=np.float32)
                if vec.ndim != 1:
                    raise ValueError("not a flat list")
            except (ValueError, TypeError) as e:
                raise ApiError(422, f"embedding must be a JSON list of numbers ({e})") from None
            vec = backend.check_embedding(vec)
            source = "embedding"
        out = backend.synthesize(vec, strategy, guidance, seed, samples, steps, source)
        items = []
        for i, r in enumerate(out):
            label = f"{strategy} seed {seed}" + (f" #{i}" if len(out) > 1 else "")
            item = results.add("synthesized", label, r.lora, r.provenance, backend.vector_of(r.lora, r.vector))
            items.append(_lora_json(item, backend.save_formats))
        if download is not None:
            first = results.get(items[0]["id"])
            data, filename, media = backend.lora_file(first.lora, download, f"lorasynth_{first.kind}_{first.id}")
            return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                                             "X-Lorasynth-Id": first.id})
        return {"face": face, "loras": items}

    @app.get("/api/loras", tags=["synthesis"], summary="LoRAs made by this server (newest last)")
    def list_loras():
        return {"loras": [_lora_json(x, backend.save_formats) for x in results.list()]}

    @app.get("/api/loras/{lora_id}", tags=["synthesis"], summary="Download a LoRA file (kohya, diffusers, ...)",
             response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}})
    def download_lora(lora_id: ID, format: Annotated[str, Query(max_length=20)] = "kohya"):
        item = stored(lora_id)
        data, filename, media = backend.lora_file(item.lora, format, f"lorasynth_{item.kind}_{item.id}")
        return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @app.post("/api/blend", tags=["blend"], summary="Weighted sum of LoRAs (exact, or best rank-r with its error)")
    def blend(req: BlendRequest):
        if len(req.items) > cfg.max_blend_items:
            raise ApiError(422, f"at most {cfg.max_blend_items} items")
        loras, weights, names = [], [], []
        for it in req.items:
            if it.source == "result":
                item = stored(it.id)
                loras.append(item.lora)
                names.append(item.label)
            else:
                if not it.id.isdigit():
                    raise ApiError(422, f"library ids are integers, got {it.id!r}")
                name, lora = backend.library_lora(int(it.id))
                loras.append(lora)
                names.append(name)
            weights.append(it.weight)
        lora, report = backend.blend(loras, weights, req.rank)
        prov = {"lorasynth.version": __version__,
                "lorasynth.blend": json.dumps({"items": names, "weights": weights, "rank": req.rank})}
        lora.metadata.update(prov)
        label = " + ".join(f"{w:g}×{n}" for n, w in zip(names, weights))[:200]
        item = results.add("blended", label, lora, prov, backend.vector_of(lora),
                           {"report": report})
        return _lora_json(item, backend.save_formats)

    @app.post("/api/generate", tags=["generate"], status_code=202,
              summary="Queue a preview with LoRAs fused (-> job id; 429 when the queue is full)")
    def generate(req: GenerateRequest = Body(...)):
        if backend.pipe is None:
            raise ApiError(404, "no base model: start the server with --base BASE to generate previews")
        if req.steps > cfg.max_steps:
            raise ApiError(422, f"steps must be <= {cfg.max_steps}")
        if max(req.width, req.height) > cfg.max_side:
            raise ApiError(422, f"width and height must be <= {cfg.max_side}")
        for x in req.loras:
            stored(x.id)
        backend.generation_settings(**req.model_dump(exclude={"loras"}))  # 400 now, not in the worker
        try:
            job = jobs.submit(req.model_dump())
        except QueueFull as e:
            raise ApiError(429, str(e)) from None
        return job.to_dict()

    @app.get("/api/jobs/{job_id}", tags=["generate"], summary="Job state and step progress")
    def job_status(job_id: ID):
        return _job(jobs, job_id).to_dict()

    @app.post("/api/jobs/{job_id}/cancel", tags=["generate"], summary="Cancel a queued or running job")
    def cancel(job_id: ID):
        job = jobs.cancel(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id}")
        return job.to_dict()

    @app.get("/api/jobs/{job_id}/image", tags=["generate"], summary="The PNG (carries its generation parameters)",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def job_image(job_id: ID):
        job = _job(jobs, job_id)
        if job.state != "done" or job.png is None:
            raise ApiError(409, f"job {job_id} is {job.state}, no image")
        return Response(job.png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="preview_{job_id}.png"'})

    @app.get("/api/library", tags=["library"], summary="List / search library entries (name, source, trainer)")
    def library(q: Annotated[str, Query(max_length=200)] = "", limit: Annotated[int, Query(ge=1, le=500)] = 50,
                offset: Annotated[int, Query(ge=0)] = 0):
        total, rows = backend.library_entries(q, limit, offset)
        return {"total": total, "offset": offset, "entries": rows}

    @app.get("/api/library/map", tags=["library"],
             summary="Latent map: 2-D PCA of the library's LoRA latents; `mark` projects a LoRA of this server")
    def latent_map(mark: Annotated[str | None, Query(pattern=r"^[0-9a-f]{16}$")] = None):
        m = backend.latent_map()
        marked, note = None, None
        if mark is not None:
            item = stored(mark)
            if item.vector is None:
                note = f"{item.label} is not on the map: it does not fit the model's layout (a blend of higher rank)"
            else:
                marked = {"id": item.id, "label": item.label, "xy": backend.project(item.vector)}
        pts = np.round(m["points"], 4)
        return {"ids": m["ids"], "x": pts[:, 0].tolist(), "y": pts[:, 1].tolist(), "marked": marked, "note": note}

    @app.post("/api/library/nearest", tags=["library"], summary="Nearest library identities to a face photo")
    async def nearest(image: Annotated[UploadFile, File()], face_index: Annotated[int, Form(ge=0, le=1000)] = 0,
                      k: Annotated[int, Form(ge=1, le=100)] = 5):
        rgb = await read_upload(image)
        vec, face, n_faces = backend.face_embedding(rgb, face_index)
        return {"face": {"index": face.index, "box": face.box, "faces_found": n_faces},
                "neighbours": backend.nearest(vec, k)}

    return app


def _job(jobs: JobQueue, job_id: str):
    job = jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id}")
    return job


def _lora_json(item, formats: list[str]) -> dict:
    return {**item.summary(), "files": {f: f"/api/loras/{item.id}?format={f}" for f in formats}}


LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _LoopbackHostOnly:
    """On a loopback bind, answer only requests addressed to a loopback name (blocks DNS rebinding:
    a web page whose domain resolves to 127.0.0.1 cannot read this server's answers)."""

    ALLOWED = {b"127.0.0.1", b"localhost", b"[::1]", b"testserver"}  # testserver: FastAPI's test client

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"")
            name = host.rsplit(b":", 1)[0] if not host.endswith(b"]") else host
            if name.lower() not in self.ALLOWED:
                return await _send_json(send, 400, "this server only answers requests addressed to 127.0.0.1 or localhost")
        return await self.app(scope, receive, send)


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before they are parsed (pure ASGI)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                return await _send_json(send, 400, "invalid Content-Length")
            if too_big:
                # Read (and drop) a moderately oversized body first: a server that answers and closes
                # with unread data makes the client's TCP stack reset, and the 413 itself gets lost.
                if int(length) <= 4 * self.limit:
                    while (await receive()).get("more_body", False):
                        pass
                return await _send_json(send, 413, f"request body larger than {self.limit} bytes")
            return await self.app(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, f"request body larger than {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


async def _send_json(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
