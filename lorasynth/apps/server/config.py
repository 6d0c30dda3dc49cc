"""Settings of one ``lorasynth serve`` process (what the command line sets, plus safety limits)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    model: str  # lorasynth model folder (``lorasynth train latent`` / ``train hypernet``)
    base: str | None = None  # SD1.5 base model: enables previews
    library: str | None = None  # LoRA library: enables listing, library entries in blends
    host: str = "127.0.0.1"
    port: int = 7860
    model_root: str | None = None  # face-model files (ArcFace); never downloaded
    max_upload_bytes: int = 20_000_000  # request bodies above this are refused (413)
    max_pixels: int = 40_000_000  # declared image size above this is refused before decoding
    queue_size: int = 4  # generation jobs waiting behind the running one; more -> 429
    max_steps: int = 100
    max_side: int = 1024
    max_samples: int = 8
    max_blend_items: int = 16  # items of one /api/blend (each distinct)
    max_blend_input_bytes: int = 2_000_000_000  # the LoRAs one blend reads, together
    results_budget_bytes: int = 1_000_000_000  # LoRAs kept in memory, in tensor bytes (oldest dropped)
    keep_results: int = 1000  # ... and at most this many of them
    keep_jobs: int = 32  # finished generation jobs kept (with their PNG)
    map_points: int = 4000  # library points on the latent map
    warm_up: bool = True  # load every model at start (first request fast; no load races)
    allow_origins: tuple[str, ...] = ()  # other web origins allowed to send state-changing requests
    workers: int = 2  # threads for CPU work (decoding, face detection, synthesis, blending, files)
    cpu_queue: int = 16  # requests waiting for a worker; more -> 503
    header_timeout: float = 10.0  # seconds a client has to send a request's headers
    body_timeout: float = 120.0  # seconds a client has to send a request's whole body
    max_connections: int = 64  # open connections; more -> 503
