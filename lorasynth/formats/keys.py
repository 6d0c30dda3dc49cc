"""Module-name resolution: file key spellings -> canonical diffusers module paths.

kohya names replace every ``.`` of a module path with ``_`` (``lora_unet_down_blocks_0_…``),
which is ambiguous to undo by hand (``to_q`` vs ``to.q``, ``transformer_blocks``…). The
names are therefore resolved against a real module tree (SD1.5 by default, or the
modules of a loaded pipeline), never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from lorasynth.errors import FormatError
from lorasynth.core.sd15 import module_shapes_of, sd15_module_shapes

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def kohya_name(module: str) -> str:
    """``unet.down_blocks.0.attn1.to_q`` -> ``lora_unet_down_blocks_0_attn1_to_q``."""
    component, path = module.split(".", 1)
    return KOHYA_PREFIXES[component] + path.replace(".", "_")


# diffusers resnet layer -> the original (SGM/LDM) ResBlock layer
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
            "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}


def sgm_unet_path(path: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str | None:
    """The original Stability (SGM/LDM) name of a diffusers UNet module path, or None.

    ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (SD1.5: two layers per
    block). The same table as ComfyUI's ``unet_to_diffusers`` and diffusers'
    ``_maybe_map_sgm_blocks_to_diffusers``, written in the diffusers -> SGM direction so names
    are resolved against a real module tree.
    """
    if path in _SGM_TOP:
        return _SGM_TOP[path]
    n = layers_per_block
    m = re.fullmatch(r"(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", path)
    if not m:
        return None
    kind, block, part, idx, rest = m.group(1), m.group(2), m.group(3), int(m.group(4)), m.group(5)
    if part == "resnets":
        head, _, tail = rest.partition(".")
        if head not in _SGM_RESNET:
            return None
        rest = _SGM_RESNET[head] + (f".{tail}" if tail else "")
    if kind == "mid_block":
        if block is not None:
            return None
        index = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((part, idx))
        return None if index is None else f"middle_block.{index}.{rest}"
    if block is None:
        return None
    b = int(block)
    if kind == "down_blocks":
        if part == "downsamplers" and rest == "conv":
            return f"input_blocks.{(n + 1) * (b + 1)}.0.op"
        if part in ("resnets", "attentions"):
            return f"input_blocks.{(n + 1) * b + idx + 1}.{0 if part == 'resnets' else 1}.{rest}"
        return None
    # up blocks have one layer more than down blocks
    if part == "upsamplers" and rest == "conv":
        return f"output_blocks.{(n + 1) * b + n}.{2 if b in up_blocks_with_attention else 1}.conv"
    if part in ("resnets", "attentions"):
        return f"output_blocks.{(n + 1) * b + idx}.{0 if part == 'resnets' else 1}.{rest}"
    return None


def _sgm_aliases(names) -> dict[str, str]:
    """``{kohya name in SGM spelling: module}`` for the UNet modules of a tree."""
    unet = [n.split(".", 1)[1] for n in names if n.startswith("unet.")]
    resnets = {int(m.group(1)) for p in unet if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", p))}
    if not resnets:
        return {}
    with_attention = {int(m.group(1)) for p in unet if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", p))}
    aliases = {}
    for path in unet:
        sgm = sgm_unet_path(path, len(resnets), with_attention)
        if sgm is not None:
            aliases[KOHYA_PREFIXES["unet"] + sgm.replace(".", "_")] = f"unet.{path}"
    return aliases


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
        for alias, name in _sgm_aliases(self.shapes).items():  # lora_unet_input_blocks_4_1_… (ComfyUI/A1111 accept them)
            self._by_kohya.setdefault(alias, name)

    @classmethod
    def from_models(cls, unet: torch.nn.Module | None = None, text_encoder: torch.nn.Module | None = None) -> "ModuleTree":
        shapes: dict[str, tuple[int, ...]] = {}
        if unet is not None:
            shapes.update(module_shapes_of(unet, "unet"))
        if text_encoder is not None:
            shapes.update(module_shapes_of(text_encoder, "text_encoder"))
        return cls(shapes)

    @classmethod
    def from_specs(cls, specs, label: str = "model's LoRA layout") -> "ModuleTree":
        """A tree of the modules a layout holds (objects with ``name``, ``down_shape``, ``up_shape``),
        e.g. ``ModuleTree.from_specs(layout.modules)`` to read LoRAs made for a non-SD1.5 layout."""
        return cls({s.name: (s.up_shape[0], *s.down_shape[1:]) for s in specs}, label)

    def resolve_kohya(self, name: str) -> str | None:
        return self._by_kohya.get(name)

    def __contains__(self, module: str) -> bool:
        return module in self.shapes

    def check(self, name: str, weight_shape: tuple[int, ...], source: str) -> None:
        """Raise FormatError unless ``name`` is a module of this tree with this weight shape."""
        if name not in self.shapes:
            raise FormatError(f"{source}: module {name} does not exist in the {self.label}")
        want = tuple(self.shapes[name])
        if tuple(weight_shape) != want:
            raise FormatError(
                f"{source}: module {name} has factors for a {tuple(weight_shape)} weight; "
                f"the {self.label} has {want} (is the LoRA for another base model?)"
            )


@lru_cache(maxsize=1)
def sd15_tree() -> ModuleTree:
    """The SD1.5 UNet + text encoder tree (from the shipped table; no weights, no diffusers)."""
    return ModuleTree(sd15_module_shapes(), "SD1.5 UNet/text encoder")


def some(names, n: int = 3) -> str:
    """``a, b, c (+4 more)`` for error messages."""
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
