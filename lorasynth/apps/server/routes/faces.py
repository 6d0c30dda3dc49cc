"""Face detection (``/api/faces``) and LoRA synthesis from a photo or an embedding (``/api/synthesize``)."""

from __future__ import annotations

import json
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from lorasynth.apps.server.api_errors import ApiError
from lorasynth.apps.server.context import ServerContext


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    backend, cfg = ctx.backend, ctx.cfg

    @r.post("/api/faces", tags=["faces"], summary="Detect faces: image -> boxes + embeddings (largest first)")
    async def faces(image: Annotated[UploadFile, File(description="a photo (JPEG, PNG, WebP...)")]):
        rgb = await ctx.read_upload(image)
        found = backend.detect_faces(rgb)
        return {"width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "embedder": backend.info.embedder,
                "faces": [f.__dict__ for f in found]}

    @r.post("/api/synthesize", tags=["synthesis"],
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
        if (image is None) == (embedding is None):
            raise ApiError(422, "send exactly one of `image` (a photo) or `embedding` (a JSON list of floats)")
        if image is not None:
            vec, face, source = await _photo_embedding(ctx, image, face_index)
        else:
            vec, face, source = _parse_embedding(ctx, embedding), None, "embedding"
        out = backend.synthesize(vec, strategy, guidance, seed, samples, steps, source)
        items = []
        for i, res in enumerate(out):
            label = f"{strategy} seed {seed}" + (f" #{i}" if len(out) > 1 else "")
            item = ctx.results.add("synthesized", label, res.lora, res.provenance, backend.vector_of(res.lora, res.vector))
            items.append(ctx.lora_json(item))
        if download is not None:
            first = ctx.results.get(items[0]["id"])
            data, filename, media = backend.lora_file(first.lora, download, f"lorasynth_{first.kind}_{first.id}")
            return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                                             "X-Lorasynth-Id": first.id})
        return {"face": face, "loras": items}

    return r


async def _photo_embedding(ctx: ServerContext, image: UploadFile, face_index: int) -> tuple[np.ndarray, dict, str]:
    """``(embedding, face JSON, source label)`` of face ``face_index`` in an uploaded photo."""
    rgb = await ctx.read_upload(image)
    vec, face_info, n_faces = ctx.backend.face_embedding(rgb, face_index)
    face = {"index": face_info.index, "box": face_info.box, "faces_found": n_faces}
    return vec, face, (image.filename or "upload")[-100:]


def _parse_embedding(ctx: ServerContext, embedding: str) -> np.ndarray:
    """A JSON list of numbers -> a checked embedding (422 when it is not a flat list of numbers)."""
    try:
        values = json.loads(embedding)
        vec = np.asarray(values, dtype=np.float32)
        if vec.ndim != 1:
            raise ValueError("not a flat list")
    except (ValueError, TypeError) as e:
        raise ApiError(422, f"embedding must be a JSON list of numbers ({e})") from None
    return ctx.backend.check_embedding(vec)
