"""The LoRAs this server made (``/api/loras``) and their files in any save format."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from lorasynth.apps.server.context import ID, ServerContext


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()

    @r.get("/api/loras", tags=["synthesis"], summary="LoRAs made by this server (newest last)")
    def list_loras():
        return {"loras": [ctx.lora_json(x) for x in ctx.results.list()]}

    @r.get("/api/loras/{lora_id}", tags=["synthesis"], summary="Download a LoRA file (kohya, diffusers, ...)",
           response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}})
    async def download_lora(lora_id: ID, format: Annotated[str, Query(max_length=20)] = "kohya"):
        item = ctx.stored(lora_id)
        data, filename, media = await ctx.run(ctx.backend.lora_file, item.lora, format, f"lorasynth_{item.kind}_{item.id}")
        return Response(data, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    return r
