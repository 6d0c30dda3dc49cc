"""Weighted sums of LoRAs (``/api/blend``): this server's results and library entries."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from lorasynth import __version__
from lorasynth.apps.server.api_errors import ApiError
from lorasynth.apps.server.context import ServerContext


class BlendItem(BaseModel):
    source: Literal["result", "library"] = Field(description="'result': a LoRA this server made; 'library': an entry")
    id: str = Field(max_length=32, description="result id, or library entry id")
    weight: float = Field(ge=-10, le=10)


class BlendRequest(BaseModel):
    items: list[BlendItem] = Field(min_length=1)
    rank: int | None = Field(default=None, ge=1, le=1024, description="None: exact sum; r: best rank-r approximation")


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()

    @r.post("/api/blend", tags=["blend"], summary="Weighted sum of LoRAs (exact, or best rank-r with its error)")
    def blend(req: BlendRequest):
        if len(req.items) > ctx.cfg.max_blend_items:
            raise ApiError(422, f"at most {ctx.cfg.max_blend_items} items")
        loras, weights, names = [], [], []
        for it in req.items:
            name, lora = _item_lora(ctx, it)
            loras.append(lora)
            names.append(name)
            weights.append(it.weight)
        lora, report = ctx.backend.blend(loras, weights, req.rank)
        prov = {"lorasynth.version": __version__,
                "lorasynth.blend": json.dumps({"items": names, "weights": weights, "rank": req.rank})}
        lora.metadata.update(prov)
        label = " + ".join(f"{w:g}×{n}" for n, w in zip(names, weights))[:200]
        item = ctx.results.add("blended", label, lora, prov, ctx.backend.vector_of(lora), {"report": report})
        return ctx.lora_json(item)

    return r


def _item_lora(ctx: ServerContext, it: BlendItem) -> tuple[str, object]:
    """``(name, LoRA)`` of one blend item: a stored result (404 if gone) or a library entry."""
    if it.source == "result":
        item = ctx.stored(it.id)
        return item.label, item.lora
    if not it.id.isdigit():
        raise ApiError(422, f"library ids are integers, got {it.id!r}")
    return ctx.backend.library_lora(int(it.id))
