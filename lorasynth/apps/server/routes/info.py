"""The page (``/``) and what this server can do (``/api/info``)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import FileResponse

from lorasynth import __version__
from lorasynth.apps.server.context import ServerContext

#: The page: plain HTML/JS/CSS, no build step, nothing fetched from the network.
STATIC = resources.files("lorasynth.apps.server") / "static"


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()

    @r.get("/", include_in_schema=False)
    def index():
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @r.get("/api/info", tags=["server"], summary="What this server can do (model, formats, limits, memory held)")
    async def info():  # on the event loop, never behind the CPU workers: answered while they are busy
        return {"version": __version__, **ctx.backend.describe(), "limits": ctx.limits(), "jobs": ctx.jobs.counts(),
                "results": ctx.results.usage()}

    return r
