"""Small builders shared by tests (no fixtures here: import what you need)."""

from __future__ import annotations

import torch

from lorasynth.lora import LoRA, LoRAModule
from lorasynth.sd15 import sd15_module_shapes

ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
TE = "text_encoder.text_model.encoder.layers.0"


def random_lora(names_shapes: dict[str, tuple[int, ...]], rank: int = 4, alpha: float = 8.0,
                seed: int = 0, dtype=torch.float32) -> LoRA:
    """A LoRA with random factors on the given weight shapes (Linear or Conv)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, shape in names_shapes.items():
        out, rest = shape[0], tuple(shape[1:])
        up_tail = (1, 1) if len(rest) == 3 else ()
        down = torch.randn((rank, *rest), generator=g, dtype=torch.float64).to(dtype)
        up = torch.randn((out, rank, *up_tail), generator=g, dtype=torch.float64).to(dtype)
        modules[name] = LoRAModule(down, up, alpha)
    return LoRA(modules)


def sd15_lora(names: list[str], rank: int = 4, alpha: float = 8.0, seed: int = 0, dtype=torch.float32) -> LoRA:
    shapes = sd15_module_shapes()
    return random_lora({n: shapes[n] for n in names}, rank, alpha, seed, dtype)


def max_delta_diff(a: LoRA, b: LoRA) -> float:
    assert set(a.modules) == set(b.modules)
    return max((a.modules[n].delta(torch.float64) - b.modules[n].delta(torch.float64)).abs().max().item() for n in a.modules)
