"""Weighted sums of LoRAs (``/api/blend``): this server's results and library entries.

A blend cannot amplify memory: its items are distinct (a repeated item is refused: give it
the summed weight), at most ``cfg.max_blend_items`` of them reading at most
``cfg.max_blend_input_bytes`` together; an exact blend is capped at each module's full rank
``min(out, in)`` (re-factored losslessly); and a result larger than the server's result
budget (``cfg.results_budget_bytes``) is refused before it is computed.
"""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from lorasynth import __version__
from lorasynth.apps.server.api_errors import ApiError
from lorasynth.apps.server.context import ServerContext
from lorasynth.apps.server.results import lora_nbytes
from lorasynth.core.numbers import parse_id


class BlendItem(BaseModel):
    source: Literal["result", "library"] = Field(description="'result': a LoRA this server made; 'library': an entry")
    id: str = Field(max_length=32, description="result id, or library entry id")
    weight: float = Field(ge=-10, le=10, strict=True, description="finite, -10..10 (true/false are not numbers)")


class BlendRequest(BaseModel):
    items: list[BlendItem] = Field(min_length=1, max_length=256, description="distinct items (see /api/info limits)")
    rank: int | None = Field(default=None, ge=1, le=1024, strict=True, description="None: exact sum; r: best rank-r approximation")


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()

    @r.post("/api/blend", tags=["blend"], summary="Weighted sum of LoRAs (exact, or best rank-r with its error)")
    async def blend(req: BlendRequest):
        cfg = ctx.cfg
        if len(req.items) > cfg.max_blend_items:
            raise ApiError(422, f"at most {cfg.max_blend_items} items in one blend, got {len(req.items)}")
        keys = [item_key(ctx, it) for it in req.items]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                raise ApiError(422, f"items[{i}] repeats items[{keys.index(key)}] ({key[0]} {key[1]}); "
                                    f"give each LoRA once, with the summed weight")
        return await ctx.run(run_blend, ctx, req, keys)

    return r


def item_key(ctx: ServerContext, it: BlendItem) -> tuple[str, str | int]:
    """``(source, id)`` naming one item (a library id as the integer it reads as), or 404 / 422."""
    if it.source == "result":
        return "result", ctx.stored(it.id).id
    return "library", parse_id(it.id, "library id")


def run_blend(ctx: ServerContext, req: BlendRequest, keys: list[tuple[str, str | int]]) -> dict:
    """The blend's CPU work (on the worker pool): read the items, check the sizes, blend, keep the result."""
    cfg, backend = ctx.cfg, ctx.backend
    loras, weights, names, read = [], [], [], 0
    for (source, key), it in zip(keys, req.items):
        if source == "result":
            item = ctx.stored(key)
            name, lora = item.label, item.lora
        else:
            name, lora = backend.library_lora(key)
        read += lora_nbytes(lora)
        if read > cfg.max_blend_input_bytes:
            raise ApiError(413, f"the blend's items take more than {cfg.max_blend_input_bytes / 1e6:.0f} MB together; "
                                f"blend fewer or smaller LoRAs")
        loras.append(lora)
        names.append(name)
        weights.append(it.weight)
    size = backend.blend_nbytes(loras, req.rank)
    if size > cfg.results_budget_bytes:
        raise ApiError(413, f"the blend would take {size / 1e6:.1f} MB, more than this server keeps in memory "
                            f"({cfg.results_budget_bytes / 1e6:.1f} MB); ask for a lower rank or fewer items")
    lora, report = backend.blend(loras, weights, req.rank)
    prov = {"lorasynth.version": __version__,
            "lorasynth.blend": json.dumps({"items": names, "weights": weights, "rank": req.rank})}
    lora.metadata.update(prov)
    label = " + ".join(f"{w:g}×{n}" for n, w in zip(names, weights))[:200]
    return ctx.lora_json(ctx.store("blended", label, lora, prov, backend.vector_of(lora), {"report": report}))
