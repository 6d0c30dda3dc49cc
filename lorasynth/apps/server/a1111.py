"""Names as AUTOMATIC1111 / Forge see them: what a ``<lora:name:scale>`` tag calls this server's LoRAs."""

from __future__ import annotations


def lora_name(kind: str, item_id: str) -> str:
    """The stem of the kohya download (``lorasynth_<kind>_<id>_kohya.safetensors``): the name A1111 gives
    the file in its ``models/Lora`` folder, so a pasted ``<lora:name:scale>`` finds it."""
    return f"lorasynth_{kind}_{item_id}_kohya"
