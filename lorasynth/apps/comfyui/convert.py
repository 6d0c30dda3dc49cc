"""The bridge between lorasynth's in-memory LoRA and ComfyUI's LoRA patching.

ComfyUI maps kohya keys (``lora_unet_…`` / ``lora_te_…`` with ``lora_down``, ``lora_up``
and ``alpha``) onto its own weights completely, so the nodes hand it exactly that. This
module has no ComfyUI import: it works on the key map ComfyUI builds
(``comfy.lora.model_lora_keys_unet/clip``) passed in as a plain dict.
"""

from __future__ import annotations

import torch

from lorasynth.errors import LayoutError, LorasynthError
from lorasynth.formats.keys import kohya_name, sd15_tree, some
from lorasynth.core.lora import LoRA


def check_sd15_shapes(shapes: dict[str, tuple[int, ...]], what: str, error: type[LorasynthError] = LayoutError) -> None:
    """Raise ``error`` unless every ``{module: weight shape}`` is an SD1.5 module with SD1.5's weight shape.

    Catches LoRAs (and synthesis models) made for another base, e.g. SDXL, whose context
    width (2048) and block layout differ.
    """
    tree = sd15_tree()
    unknown = [n for n in shapes if n not in tree]
    if unknown:
        raise error(f"{what} is not for Stable Diffusion 1.5: modules {some(unknown)} do not exist in SD1.5")
    for name, shape in shapes.items():
        if tuple(shape) != tuple(tree.shapes[name]):
            raise error(f"{what} is not for Stable Diffusion 1.5: {name} updates a {tuple(shape)} weight, "
                        f"SD1.5's is {tuple(tree.shapes[name])}")


def check_sd15(lora: LoRA, what: str = "LoRA") -> None:
    """:func:`check_sd15_shapes` for a LoRA's modules."""
    check_sd15_shapes({n: m.weight_shape for n, m in lora.modules.items()}, what)


def as_lora(value, what: str = "lora") -> LoRA:
    """The node input as a LoRA, or a clear error when another node pack's object was wired in."""
    if not isinstance(value, LoRA):
        raise LorasynthError(f"{what} input is a {type(value).__name__}, not a lorasynth LoRA")
    return value


def kohya_state_dict(lora: LoRA) -> dict[str, torch.Tensor]:
    """kohya-keyed tensors of ``lora`` (each module's own alpha; delta = alpha/rank · up @ down)."""
    sd: dict[str, torch.Tensor] = {}
    for name in sorted(lora.modules):
        m, k = lora.modules[name], kohya_name(name)
        sd[f"{k}.lora_down.weight"] = m.down
        sd[f"{k}.lora_up.weight"] = m.up
        sd[f"{k}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return sd


def unmapped_modules(lora: LoRA, key_map: dict[str, str]) -> list[str]:
    """Modules of ``lora`` whose kohya name is not in ComfyUI's key map (so ComfyUI would skip them)."""
    return [n for n in lora.modules if kohya_name(n) not in key_map]


def check_against_model(lora: LoRA, key_map: dict[str, str], weight_shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise LayoutError unless every module maps to a weight of the loaded model with the right shape.

    ``key_map``: ComfyUI's kohya name -> state-dict key of the model; ``weight_shapes``:
    state-dict key -> shape for the models being patched.
    """
    missing = unmapped_modules(lora, key_map)
    if missing:
        raise LayoutError(f"the loaded model has no layer for LoRA modules {some(missing)}")
    for name, m in lora.modules.items():
        key = key_map[kohya_name(name)]
        shape = weight_shapes.get(key)
        if shape is not None and tuple(shape) != tuple(m.weight_shape):
            raise LayoutError(
                f"LoRA module {name} updates a {tuple(m.weight_shape)} weight but the loaded model's is "
                f"{tuple(shape)}: the LoRA is for another base model (this pack supports SD1.5)"
            )
