"""Generation jobs: one worker thread, a bounded queue, progress and cancellation.

Generation is CPU-bound and uses the one loaded pipeline, so jobs run one at a time; at most
``queue_size`` wait behind the running one (``submit`` raises :class:`QueueFull` beyond that,
the server answers 429). Cancelling a queued job drops it; cancelling the running job stops
it at the next denoising step (the step callback raises), and the fused LoRAs are restored.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("lorasynth.apps.server")


class QueueFull(Exception):
    pass


class JobCancelled(Exception):
    pass


@dataclass
class Job:
    id: str
    params: dict
    state: str = "queued"  # queued | running | done | cancelled | error
    step: int = 0
    total: int = 0
    error: str | None = None
    png: bytes | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    started: float | None = None  # when the worker took it (step rate, history)
    cancel_requested: bool = False

    def progress(self, step: int, total: int) -> None:
        self.step, self.total = step, total
        if self.cancel_requested:
            raise JobCancelled()

    def to_dict(self) -> dict:
        return {"id": self.id, "state": self.state, "step": self.step, "total": self.total, "error": self.error,
                "image": f"/api/jobs/{self.id}/image" if self.state == "done" else None, "params": self.params,
                "created": self.created, "started": self.started, "finished": self.finished}


class JobQueue:
    def __init__(self, run: Callable[[Job], bytes], queue_size: int, keep: int):
        self._run = run
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max(1, queue_size))
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._keep = max(1, keep)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="lorasynth-generate", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and end the worker (called on shutdown, e.g. Ctrl-C)."""
        self._stopping.set()
        with self._lock:
            for job in self._jobs.values():
                job.cancel_requested = True
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, params: dict) -> Job:
        if self._stopping.is_set():
            raise QueueFull("the server is shutting down")
        job = Job(secrets.token_hex(8), params)
        with self._lock:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(f"the generation queue is full ({self._queue.maxsize} waiting); try again later") from None
            self._jobs[job.id] = job
            self._trim()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.state in ("queued", "running"):
                job.cancel_requested = True
                if job.state == "queued":
                    job.state, job.finished = "cancelled", time.time()
        return job

    def list(self) -> list[Job]:
        """The jobs this queue remembers (the last ``keep`` finished ones and every open one), oldest first."""
        with self._lock:
            return list(self._jobs.values())

    def counts(self) -> dict:
        with self._lock:
            states = [j.state for j in self._jobs.values()]
        return {s: states.count(s) for s in ("queued", "running", "done", "cancelled", "error")}

    def _trim(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.state in ("done", "cancelled", "error")]
        for k in finished[: max(0, len(self._jobs) - self._keep)]:
            del self._jobs[k]

    def _work(self) -> None:
        while not self._stopping.is_set():
            job = self._queue.get()
            if job is None:
                break
            with self._lock:
                if job.cancel_requested:
                    continue
                job.state, job.started = "running", time.time()
            try:
                png = self._run(job)
            except JobCancelled:
                job.state = "cancelled"
            except Exception as exc:  # a job's failure must not kill the worker
                from lorasynth.errors import LorasynthError

                if not isinstance(exc, LorasynthError):
                    log.exception("generation job %s failed", job.id)
                job.state, job.error = "error", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            else:
                job.png, job.state = png, "done"
            job.finished = time.time()
            with self._lock:
                self._trim()
