"""Module-name resolution: file key spellings -> canonical diffusers module paths.

kohya names replace every ``.`` of a module path with ``_`` (``lora_unet_down_blocks_0_…``),
which is ambiguous to undo by hand (``to_q`` vs ``to.q``, ``transformer_blocks``…). The
names are therefore resolved against a real module tree (SD1.5 by default, or the
modules of a loaded pipeline), never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..errors import FormatError
from ..sd15 import module_shapes_of, sd15_module_shapes

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def kohya_name(module: str) -> str:
    """``unet.down_blocks.0.attn1.to_q`` -> ``lora_unet_down_blocks_0_attn1_to_q``."""
    component, path = module.split(".", 1)
    return KOHYA_PREFIXES[component] + path.replace(".", "_")


@dataclass
class ModuleTree:
    """Names and weight shapes of the Linear/Conv modules a LoRA may target."""

    shapes: dict[str, tuple[int, ...]]
    label: str = "base model's UNet/text encoder"
    _by_kohya: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_kohya = {}
        for name in self.shapes:
            k = kohya_name(name)
            if k in self._by_kohya:  # would make kohya names ambiguous for this tree
                raise FormatError(f"module tree has two modules with kohya name {k}")
            self._by_kohya[k] = name

    @classmethod
    def from_models(cls, unet: torch.nn.Module | None = None, text_encoder: torch.nn.Module | None = None) -> "ModuleTree":
        shapes: dict[str, tuple[int, ...]] = {}
        if unet is not None:
            shapes.update(module_shapes_of(unet, "unet"))
        if text_encoder is not None:
            shapes.update(module_shapes_of(text_encoder, "text_encoder"))
        return cls(shapes)

    def resolve_kohya(self, name: str) -> str | None:
        return self._by_kohya.get(name)

    def __contains__(self, module: str) -> bool:
        return module in self.shapes


@lru_cache(maxsize=1)
def sd15_tree() -> ModuleTree:
    """The SD1.5 UNet + text encoder tree (from the shipped table; no weights, no diffusers)."""
    return ModuleTree(sd15_module_shapes(), "SD1.5 UNet/text encoder")


def some(names, n: int = 3) -> str:
    """``a, b, c (+4 more)`` for error messages."""
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
