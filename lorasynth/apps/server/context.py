"""What every router of one app shares: its config, backend, result store and job queue,
and the helpers several routers use (uploads, stored LoRAs, jobs, the LoRA JSON shape)."""

from __future__ import annotations

from typing import Annotated, Callable

import numpy as np
from fastapi import Path, UploadFile

from lorasynth.apps.server.api_errors import ApiError
from lorasynth.apps.server.backend import Backend
from lorasynth.apps.server.config import ServerConfig
from lorasynth.apps.server.jobs import Job, JobQueue
from lorasynth.apps.server.results import ResultStore, StoredLoRA

#: A path parameter holding an id this server handed out (a result or a job).
ID = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$", description="id returned by the API")]


class ServerContext:
    """One app's state. ``run_job(ctx, job)`` is what the generation worker runs for each job."""

    def __init__(self, cfg: ServerConfig, backend: Backend, run_job: Callable[[ServerContext, Job], bytes]):
        self.cfg = cfg
        self.backend = backend
        self.results = ResultStore(cfg.keep_results)
        self.jobs = JobQueue(lambda job: run_job(self, job), cfg.queue_size, cfg.keep_jobs)

    async def read_upload(self, image: UploadFile) -> np.ndarray:
        """An uploaded photo as upright RGB (413 over the upload limit; the backend checks the pixels)."""
        data = await image.read(self.cfg.max_upload_bytes + 1)
        if len(data) > self.cfg.max_upload_bytes:
            raise ApiError(413, f"upload larger than {self.cfg.max_upload_bytes} bytes")
        return self.backend.decode_image(data, self.cfg.max_pixels)

    def stored(self, item_id: str) -> StoredLoRA:
        """A LoRA this server made, or 404."""
        item = self.results.get(item_id)
        if item is None:
            raise ApiError(404, f"no LoRA {item_id} on this server (results are kept in memory; the oldest are dropped)")
        return item

    def job(self, job_id: str) -> Job:
        """A generation job, or 404."""
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id}")
        return job

    def lora_json(self, item: StoredLoRA) -> dict:
        """A stored LoRA as the API shows it: its summary plus a download URL per format."""
        return {**item.summary(), "files": {f: f"/api/loras/{item.id}?format={f}" for f in self.backend.save_formats}}
