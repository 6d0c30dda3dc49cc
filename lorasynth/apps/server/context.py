"""What every router of one app shares: its config, backend, result store, job queue and CPU
worker pool, and the helpers several routers use (uploads, stored LoRAs, jobs, the LoRA JSON shape).

CPU work (decoding, face detection, synthesis, blending, writing files) runs through
:meth:`ServerContext.run` on a pool of ``cfg.workers`` threads, never on the event loop, so
``/api/info``, job polling and downloads stay answered while uploads are being processed. At most
``cfg.cpu_queue`` requests wait for a worker; more are answered 503.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Callable, TypeVar

import numpy as np
from fastapi import Path, UploadFile

from lorasynth.apps.server.a1111 import lora_name
from lorasynth.apps.server.api_errors import ApiError
from lorasynth.apps.server.backend import Backend
from lorasynth.apps.server.config import ServerConfig
from lorasynth.apps.server.jobs import Job, JobQueue
from lorasynth.apps.server.results import OverBudget, ResultStore, StoredLoRA

#: A path parameter holding an id this server handed out (a result or a job).
ID = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$", description="id returned by the API")]
T = TypeVar("T")


class ServerContext:
    """One app's state. ``run_job(ctx, job)`` is what the generation worker runs for each job."""

    def __init__(self, cfg: ServerConfig, backend: Backend, run_job: Callable[[ServerContext, Job], bytes]):
        self.cfg = cfg
        self.backend = backend
        self.results = ResultStore(cfg.keep_results, cfg.results_budget_bytes)
        self.jobs = JobQueue(lambda job: run_job(self, job), cfg.queue_size, cfg.keep_jobs)
        self.pool: ThreadPoolExecutor | None = None  # started on first use, again after close()
        self._pending = 0
        self._pending_lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the CPU worker pool (503 when ``cfg.cpu_queue`` requests already wait)."""
        with self._pending_lock:
            if self._pending >= self.cfg.workers + self.cfg.cpu_queue:
                raise ApiError(503, f"the server is busy ({self._pending} requests in progress or waiting); "
                                    f"try again shortly")
            self._pending += 1
            if self.pool is None:
                self.pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.workers), thread_name_prefix="lorasynth-cpu")
            pool = self.pool
        try:
            return await asyncio.wrap_future(pool.submit(fn, *args))
        finally:
            with self._pending_lock:
                self._pending -= 1

    def close(self) -> None:
        """Stop the worker pool (at shutdown); work still queued is dropped."""
        with self._pending_lock:
            pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    async def upload_bytes(self, image: UploadFile) -> bytes:
        """An upload's bytes (413 over the upload limit)."""
        data = await image.read(self.cfg.max_upload_bytes + 1)
        if len(data) > self.cfg.max_upload_bytes:
            raise ApiError(413, f"upload larger than {self.cfg.max_upload_bytes} bytes")
        return data

    def photo_embedding(self, data: bytes, face_index: int) -> tuple[np.ndarray, dict]:
        """``(embedding, face JSON)`` of face ``face_index`` in uploaded photo bytes (CPU work: call it on the pool)."""
        rgb = self.backend.decode_image(data, self.cfg.max_pixels)
        vec, face_info, n_faces = self.backend.face_embedding(rgb, face_index)
        return vec, {"index": face_info.index, "box": face_info.box, "faces_found": n_faces}

    def store(self, kind: str, label: str, lora, provenance: dict, vector=None, extra: dict | None = None) -> StoredLoRA:
        """Keep a result (the oldest are dropped to stay in the byte budget; 413 if it alone is over)."""
        try:
            return self.results.add(kind, label, lora, provenance, vector, extra)
        except OverBudget as e:
            raise ApiError(413, str(e)) from None

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
        """A stored LoRA as the API shows it: its summary, a download URL per format, its A1111 name."""
        return {**item.summary(), "files": {f: f"/api/loras/{item.id}?format={f}" for f in self.backend.save_formats},
                "a1111_name": lora_name(item.kind, item.id), "editable": item.vector is not None}

    def limits(self) -> dict:
        """The server's limits, as ``/api/info`` states them."""
        c = self.cfg
        return {"upload_bytes": c.max_upload_bytes, "pixels": c.max_pixels, "queue": c.queue_size,
                "steps": c.max_steps, "side": c.max_side, "samples": c.max_samples,
                "blend_items": c.max_blend_items, "blend_input_bytes": c.max_blend_input_bytes,
                "blend_rank": "exact blends are capped at each module's full rank min(out, in), losslessly",
                "results_bytes": c.results_budget_bytes, "results": c.keep_results,
                "workers": c.workers, "waiting_requests": c.cpu_queue,
                "header_timeout_s": c.header_timeout, "body_timeout_s": c.body_timeout,
                "connections": c.max_connections}
