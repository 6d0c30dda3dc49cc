"""Previews: queue a generation with LoRAs fused (``/api/generate``), follow, cancel, fetch the PNG."""

from __future__ import annotations

from fastapi import APIRouter, Body
from fastapi.responses import Response
from pydantic import BaseModel, Field

from lorasynth.apps.server.a1111 import lora_name
from lorasynth.apps.server.api_errors import ApiError
from lorasynth.apps.server.context import ID, ServerContext
from lorasynth.apps.server.jobs import Job, QueueFull


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


def run_job(ctx: ServerContext, job: Job) -> bytes:
    """The generation worker's task: one job's PNG (its parameters in the PNG's text chunks)."""
    p = job.params
    backend = ctx.backend
    items = [(ctx.stored(x["id"]), x["scale"]) for x in p["loras"]]
    settings = backend.generation_settings(**{k: p[k] for k in (
        "prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height", "scheduler")})
    # A1111 infotext: <lora:name:scale> in the prompt, "Lora hashes", "Model" (+ "Model hash" of a checkpoint file)
    named = [(lora_name(item.kind, item.id), item.lora) for item, _ in items]
    extra = {**backend.infotext_fields(named), "Lorasynth model": backend.describe()["model"]}
    tags = [(name, scale) for (name, _), (_, scale) in zip(named, items)]
    return backend.generate_png([(item.lora, scale) for item, scale in items], settings, extra, job.progress, tags)


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    backend, cfg, jobs = ctx.backend, ctx.cfg, ctx.jobs

    @r.post("/api/generate", tags=["generate"], status_code=202,
            summary="Queue a preview with LoRAs fused (-> job id; 429 when the queue is full)")
    def generate(req: GenerateRequest = Body(...)):
        if backend.pipe is None:
            raise ApiError(404, "no base model: start the server with --base BASE to generate previews")
        if req.steps > cfg.max_steps:
            raise ApiError(422, f"steps must be <= {cfg.max_steps}")
        if max(req.width, req.height) > cfg.max_side:
            raise ApiError(422, f"width and height must be <= {cfg.max_side}")
        for x in req.loras:
            ctx.stored(x.id)
        backend.generation_settings(**req.model_dump(exclude={"loras"}))  # 400 now, not in the worker
        try:
            job = jobs.submit(req.model_dump())
        except QueueFull as e:
            raise ApiError(429, str(e)) from None
        return job.to_dict()

    @r.get("/api/jobs/{job_id}", tags=["generate"], summary="Job state and step progress")
    def job_status(job_id: ID):
        return ctx.job(job_id).to_dict()

    @r.post("/api/jobs/{job_id}/cancel", tags=["generate"], summary="Cancel a queued or running job")
    def cancel(job_id: ID):
        job = jobs.cancel(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id}")
        return job.to_dict()

    @r.get("/api/jobs/{job_id}/image", tags=["generate"], summary="The PNG (carries its generation parameters)",
           response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def job_image(job_id: ID):
        job = ctx.job(job_id)
        if job.state != "done" or job.png is None:
            raise ApiError(409, f"job {job_id} is {job.state}, no image")
        return Response(job.png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="preview_{job_id}.png"'})

    return r
