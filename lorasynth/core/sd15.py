"""The Stable Diffusion 1.5 module tree: names and weight shapes of every Linear/Conv2d.

LoRA files name modules in several spellings (kohya replaces every ``.`` with ``_``);
they are resolved against this real tree, never guessed. The table ships as
``data/sd15_modules.json`` (regenerate with ``scripts/make_sd15_modules.py``), so
reading a LoRA file needs neither diffusers nor any weights.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import torch

# SD1.5's CLIP ViT-L/14 text encoder (transformers' defaults are a smaller CLIP).
SD15_TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)

# The 16 transformer blocks a weights2weights LoRA touches, in sorted order.
SD15_ATTENTION_BLOCKS = tuple(
    sorted(
        [f"down_blocks.{b}.attentions.{i}" for b in range(3) for i in range(2)]
        + ["mid_block.attentions.0"]
        + [f"up_blocks.{b}.attentions.{i}" for b in (1, 2, 3) for i in range(3)]
    )
)


def file_path(prefix: str, path: str) -> str:
    """The module path as LoRA files spell it.

    transformers >= 5 dropped the ``text_model.`` level of ``CLIPTextModel``; every LoRA
    file (kohya ``lora_te_text_model_…``, diffusers ``text_encoder.text_model.…``) keeps it.
    """
    if prefix == "text_encoder" and not path.startswith("text_model."):
        return "text_model." + path
    return path


def get_layer(model: torch.nn.Module, prefix: str, path: str) -> torch.nn.Module:
    """The submodule at a file-spelled ``path`` of ``model`` (either transformers spelling)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        if prefix == "text_encoder" and path.startswith("text_model."):
            return model.get_submodule(path[len("text_model."):])
        raise


def module_shapes_of(model: torch.nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    """``{prefix.path: weight shape}`` for every Linear and Conv2d of ``model`` (file spelling)."""
    return {
        f"{prefix}.{file_path(prefix, name)}": tuple(mod.weight.shape)
        for name, mod in model.named_modules()
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))
    }


def build_sd15_module_shapes() -> dict[str, tuple[int, ...]]:
    """Build the SD1.5 UNet and text encoder on the meta device and list their layers."""
    from diffusers import UNet2DConditionModel  # slow import: only here
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # defaults are SD1.5
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
    return {**module_shapes_of(unet, "unet"), **module_shapes_of(text, "text_encoder")}


@lru_cache(maxsize=1)
def sd15_module_shapes() -> dict[str, tuple[int, ...]]:
    """The shipped SD1.5 table: ``{'unet.<path>' | 'text_encoder.<path>': weight shape}``."""
    raw = json.loads(resources.files("lorasynth.data").joinpath("sd15_modules.json").read_text())
    return {k: tuple(v) for k, v in raw.items()}
