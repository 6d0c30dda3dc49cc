"""Face detection (``/api/faces``) and LoRA synthesis from a photo or an embedding (``/api/synthesize``).

The upload is read on the event loop; decoding, detection, synthesis and file writing run on the
CPU worker pool (:meth:`ServerContext.run`). The knobs (guidance, steps, seed, samples) are checked
by ``SynthesisSettings.validate``, the rules the CLI applies.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from lorasynth.apps.server.api_errors import ApiError
from lorasynth.apps.server.context import ServerContext


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    backend, cfg = ctx.backend, ctx.cfg

    @r.post("/api/faces", tags=["faces"], summary="Detect faces: image -> boxes + embeddings (largest first)")
    async def faces(image: Annotated[UploadFile, File(description="a photo (JPEG, PNG, WebP...)")]):
        data = await ctx.upload_bytes(image)

        def work():
            rgb = backend.decode_image(data, cfg.max_pixels)
            found = backend.detect_faces(rgb)
            return {"width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "embedder": backend.info.embedder,
                    "faces": [f.__dict__ for f in found]}

        return await ctx.run(work)

    @r.post("/api/synthesize", tags=["synthesis"],
            summary="Synthesize LoRAs from a photo (image + face_index) or an embedding (JSON list)")
    async def synthesize(
        image: Annotated[UploadFile | None, File(description="a photo; or send `embedding`")] = None,
        embedding: Annotated[str | None, Form(max_length=200_000, description="JSON list of floats")] = None,
        face_index: Annotated[int, Form(ge=0, le=1000)] = 0,
        strategy: Annotated[str, Form()] = "diffusion",
        guidance: Annotated[float | None, Form(description="classifier-free guidance (the CLI's range)")] = None,
        steps: Annotated[int | None, Form(description="sampling steps (the CLI's range)")] = None,
        seed: Annotated[int, Form(description="0..2**63-1")] = 0,
        samples: Annotated[int, Form(ge=1)] = 1,
        download: Annotated[str | None, Query(max_length=20, description="a format: answer with the LoRA file itself "
                                              "(provenance in its metadata) instead of JSON")] = None,
    ):
        if samples > cfg.max_samples:
            raise ApiError(422, f"samples must be <= {cfg.max_samples}")
        if strategy == "sample" and image is None and embedding is None:
            data, source = None, "new identity"  # sample: unconditional, no face needed
        elif (image is None) == (embedding is None):
            raise ApiError(422, "send exactly one of `image` (a photo) or `embedding` (a JSON list of floats)")
        elif image is not None:
            data, source = await ctx.upload_bytes(image), (image.filename or "upload")[-100:]
        else:
            data, source = None, "embedding"

        def work():
            vec, face = None, None
            if image is not None:
                vec, face = ctx.photo_embedding(data, face_index)
            elif embedding is not None:
                vec = backend.embedding_from_json(embedding)
            out = backend.synthesize(vec, strategy, guidance, seed, samples, steps, source)
            items = []
            for i, res in enumerate(out):
                label = " · ".join([source] + ([f"face {face['index']}"] if face else []) + [strategy, f"seed {seed}"])
                label += f" #{i}" if len(out) > 1 else ""  # e.g. "t1.jpg · face 2 · diffusion · seed 7"
                extra = {"source": source, "face": face, "strategy": strategy, "seed": seed,
                         "timings": {k: round(v, 4) for k, v in res.timings.items()}}
                items.append(ctx.store("synthesized", label, res.lora, res.provenance,
                                       backend.vector_of(res.lora, res.vector), extra))
            if download is not None:
                first = items[0]
                body, filename, media = backend.lora_file(first.lora, download, f"lorasynth_{first.kind}_{first.id}")
                return Response(body, media_type=media, headers={
                    "Content-Disposition": f'attachment; filename="{filename}"', "X-Lorasynth-Id": first.id})
            return {"face": face, "loras": [ctx.lora_json(x) for x in items]}

        return await ctx.run(work)

    return r
