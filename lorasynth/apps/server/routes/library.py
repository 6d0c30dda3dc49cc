"""The LoRA library: list/search (``/api/library``), the latent map, nearest identities to a face."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Query, UploadFile

from lorasynth.apps.server.context import ServerContext


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    backend = ctx.backend

    @r.get("/api/library", tags=["library"], summary="List / search library entries (name, source, trainer)")
    async def library(q: Annotated[str, Query(max_length=200)] = "", limit: Annotated[int, Query(ge=1, le=500)] = 50,
                      offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0):
        total, rows = await ctx.run(backend.library_entries, q, limit, offset)
        return {"total": total, "offset": offset, "entries": rows}

    @r.get("/api/library/map", tags=["library"],
           summary="Latent map: 2-D PCA of the library's LoRA latents; `mark` projects a LoRA of this server")
    async def latent_map(mark: Annotated[str | None, Query(pattern=r"^[0-9a-f]{16}$")] = None):
        item = ctx.stored(mark) if mark is not None else None

        def work():
            m = backend.latent_map()
            marked, note = None, None
            if item is not None:
                if item.vector is None:
                    note = f"{item.label} is not on the map: it does not fit the model's layout (a blend of higher rank)"
                else:
                    marked = {"id": item.id, "label": item.label, "xy": backend.project(item.vector)}
            pts = np.round(m.points, 4)
            return {"ids": m.ids, "x": pts[:, 0].tolist(), "y": pts[:, 1].tolist(), "marked": marked, "note": note}

        return await ctx.run(work)

    @r.post("/api/library/nearest", tags=["library"], summary="Nearest library identities to a face photo")
    async def nearest(image: Annotated[UploadFile, File()], face_index: Annotated[int, Form(ge=0, le=1000)] = 0,
                      k: Annotated[int, Form(ge=1, le=100)] = 5):
        data = await ctx.upload_bytes(image)

        def work():
            vec, face = ctx.photo_embedding(data, face_index)
            return {"face": face, "neighbours": backend.nearest(vec, k)}

        return await ctx.run(work)

    return r
