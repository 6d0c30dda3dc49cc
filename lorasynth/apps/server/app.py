"""The FastAPI app: config, middleware, the error contract and the routers, wired together.

Contract: every bad input gets a 4xx with ``{"error": "..."}``; an unexpected failure gets
``500 {"error": "internal error ..."}`` (logged, no traceback sent). No route takes a
filesystem path: files go in as uploads and come out as response bodies.

The routes live in :mod:`lorasynth.apps.server.routes` (one router per resource), the error
handlers in :mod:`.api_errors`, the ASGI guards in :mod:`.middleware`, the state they share
in :mod:`.context`.

Guards, outermost first: exact Host matching of the bound names (:class:`.middleware.HostCheck`),
same-origin state changes (:class:`.middleware.SameOriginOnly`; ``cfg.allow_origins`` opts other
origins in, with CORS), and the body's size limit and deadline (:class:`.middleware.BodyGuard`).
CPU work runs on the context's bounded worker pool; the header timeout is the protocol's
(:mod:`.protocol`, set by ``lorasynth serve``).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from lorasynth import __version__
from lorasynth.apps.server.api_errors import add_error_handlers
from lorasynth.apps.server.backend import Backend
from lorasynth.apps.server.config import ServerConfig
from lorasynth.apps.server.context import ServerContext
from lorasynth.apps.server.middleware import BodyGuard, HostCheck, SameOriginOnly, bound_host_names, normalize_origin
from lorasynth.apps.server.routes import blend, edit, faces, history, info, library, loras, previews

#: The routers in the order they are included (the order of the paths in ``/openapi.json``).
ROUTERS = (info, faces, loras, blend, edit, previews, history, library)


def create_app(cfg: ServerConfig, backend: Backend | None = None) -> FastAPIOffline:
    """The app for ``cfg``; ``backend`` may be given (tests share one across apps)."""
    ctx = ServerContext(cfg, backend or Backend(cfg), previews.run_job)

    @asynccontextmanager
    async def lifespan(app):
        if cfg.warm_up:
            ctx.backend.warm_up()
        ctx.jobs.start()
        try:
            yield
        finally:
            ctx.jobs.stop()
            ctx.close()

    app = FastAPIOffline(
        title="lorasynth", version=__version__, lifespan=lifespan,
        description="Photo in, LoRA out: face detection, zero-shot LoRA synthesis, blending, previews, library. "
                    "Every error is a JSON body {\"error\": ...}.",
    )
    app.state.backend, app.state.results, app.state.jobs = ctx.backend, ctx.results, ctx.jobs
    app.state.ctx = ctx
    allowed = frozenset(normalize_origin(o) for o in cfg.allow_origins)
    if allowed:  # the opted-in origins' pages may also read the answers (CORS)
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=sorted(allowed), allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["Content-Disposition", "X-Lorasynth-Id"])
    app.add_middleware(BodyGuard, limit=cfg.max_upload_bytes, timeout=cfg.body_timeout)
    app.add_middleware(SameOriginOnly, allowed=allowed)
    app.add_middleware(HostCheck, names=bound_host_names(cfg.host))  # added last: runs first
    app.mount("/static", StaticFiles(directory=str(info.STATIC)), name="static")
    add_error_handlers(app)
    for module in ROUTERS:
        app.include_router(module.router(ctx))
    return app
