"""Editing a LoRA of this server along a library attribute (``/api/attributes``, ``/api/edit``):
encode it into the model's latent space, move it along the direction that predicts the attribute
(least squares, as weights2weights), decode. Offered only when the library's entries carry numeric
or yes/no attributes the model's training rows can fit."""

from __future__ import annotations

import json

from fastapi import APIRouter
from pydantic import BaseModel, Field

from lorasynth import __version__
from lorasynth.apps.server.api_errors import ApiError
from lorasynth.apps.server.context import ServerContext


class EditRequest(BaseModel):
    id: str = Field(pattern=r"^[0-9a-f]{16}$", description="a LoRA this server made")
    attribute: str = Field(max_length=100)
    strength: float = Field(ge=-5, le=5, description="in standard deviations of the attribute score")


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    backend = ctx.backend

    @r.get("/api/attributes", tags=["edit"], summary="Attributes a LoRA can be edited along (empty: no edit)")
    async def attributes():
        return {"attributes": sorted(await ctx.run(backend.attribute_directions))}

    @r.post("/api/edit", tags=["edit"], summary="A LoRA moved along an attribute direction (-> a new LoRA)")
    async def edit(req: EditRequest):
        item = ctx.stored(req.id)
        if item.vector is None:
            raise ApiError(422, f"{item.label} cannot be edited: it does not fit the model's layout (a blend of higher rank)")
        lora, vector = await ctx.run(backend.edit, item.vector, req.attribute, req.strength)  # CPU pool
        prov = {**item.provenance, "lorasynth.version": __version__,
                "lorasynth.edit": json.dumps({"from": item.id, "attribute": req.attribute, "strength": req.strength})}
        lora.metadata.update(prov)
        label = f"{item.label} · {req.attribute} {req.strength:+g}σ"[:200]
        extra = {k: v for k, v in item.extra.items() if k in ("source", "face", "strategy", "seed")}
        new = ctx.store("edited", label, lora, prov, vector, {**extra, "edit": {"attribute": req.attribute,
                                                                                      "strength": req.strength}})
        return ctx.lora_json(new)

    return r
