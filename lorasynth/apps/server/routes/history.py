"""The session's history (``/api/jobs``): every generation job the server remembers, with the
queue position and an ETA from the measured step rate, so a page restores its gallery and
re-attaches to its running jobs after a reload. (The LoRAs themselves: ``GET /api/loras``.)"""

from __future__ import annotations

import io
import statistics

from fastapi import APIRouter

from lorasynth.apps.server.api_errors import ApiError
from lorasynth.apps.server.context import ID, ServerContext
from lorasynth.apps.server.jobs import Job

#: Seconds per denoising step per megapixel before any job has finished (a guess; replaced by measurement).
DEFAULT_SECONDS_PER_STEP_MP = 1.0


def step_cost(jobs: list[Job]) -> tuple[float, bool]:
    """``(seconds per step per megapixel, measured?)``: the median over finished jobs (the last 8)."""
    rates = [(j.finished - j.started) / (j.total * j.params["width"] * j.params["height"] / 1e6)
             for j in jobs if j.state == "done" and j.started and j.finished and j.total]
    return (statistics.median(rates[-8:]), True) if rates else (DEFAULT_SECONDS_PER_STEP_MP, False)


def remaining_seconds(job: Job, cost: float) -> float:
    """Estimated seconds of work left in one open job."""
    steps = job.params["steps"] - (job.step if job.state == "running" else 0)
    return max(0, steps) * cost * job.params["width"] * job.params["height"] / 1e6


def history(jobs: list[Job]) -> dict:
    """Every job, oldest first, open ones with ``position`` (0: running, 1: next...) and ``eta_s``."""
    cost, measured = step_cost(jobs)
    out, ahead, position = [], 0.0, 0
    open_jobs = sorted((j for j in jobs if j.state in ("running", "queued")), key=lambda j: (j.state != "running", j.created))
    eta = {}
    for j in open_jobs:
        ahead += remaining_seconds(j, cost)
        eta[j.id] = (position, round(ahead, 2))
        position += 1
    for j in jobs:
        d = j.to_dict()
        if j.id in eta:
            d["position"], d["eta_s"] = eta[j.id]
        if j.started and j.finished:
            d["seconds"] = round(j.finished - j.started, 3)
        out.append(d)
    return {"jobs": out, "seconds_per_step_megapixel": round(cost, 4), "measured": measured}


def png_parameters(png: bytes) -> str:
    """The ``parameters`` text chunk of a PNG this server wrote (A1111's infotext)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return str(im.text.get("parameters", ""))


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()

    @r.get("/api/jobs", tags=["generate"],
           summary="Every job the server remembers (oldest first), queue position and ETA of the open ones")
    def list_jobs():
        return history(ctx.jobs.list())

    @r.get("/api/jobs/{job_id}/parameters", tags=["generate"],
           summary="A finished preview's A1111 infotext (what its PNG carries; paste it into A1111's prompt box)")
    def parameters(job_id: ID):
        job = ctx.job(job_id)
        if job.state != "done" or job.png is None:
            raise ApiError(409, f"job {job_id} is {job.state}, no image")
        return {"parameters": png_parameters(job.png)}

    return r
