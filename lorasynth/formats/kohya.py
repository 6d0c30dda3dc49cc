"""kohya / A1111 / ComfyUI layout: ``lora_unet_<path_with_underscores>.lora_down.weight``.

Tensors per module: ``lora_down.weight`` (r x in), ``lora_up.weight`` (out x r), 0-d
``alpha``; scale = alpha / r, and no alpha means scale 1. This is the file most
likely to load everywhere, so it is lorasynth's default output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import FormatError
from ..lora import LoRA
from .common import ALPHA, DOWN, UP, group_factors, make_module, most_common, tensor_alpha
from .keys import ModuleTree, kohya_name, sd15_tree, some

_SUFFIXES = {".lora_down.weight": DOWN, ".lora_up.weight": UP, ".alpha": ALPHA}
# metadata keys a writer regenerates, so they are not carried over from an input file
FORMAT_METADATA_PREFIXES = ("ss_", "sshs_", "modelspec.", "lora_adapter_metadata", "format")


def _parse(key: str) -> tuple[str, str] | None:
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def read_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str, tree: ModuleTree | None = None) -> LoRA:
    tree = tree or sd15_tree()
    groups = group_factors(tensors, _parse, source)
    unresolved = [k for k in groups if tree.resolve_kohya(k) is None]
    if unresolved:
        raise FormatError(f"{source}: module names not found in the {tree.label}: {some(unresolved)}")
    modules = {}
    for kname, g in groups.items():
        alpha = tensor_alpha(g[ALPHA], kname, source) if ALPHA in g else None
        modules[tree.resolve_kohya(kname)] = make_module(kname, g, alpha, source)
    return LoRA(modules, dict(metadata)).sorted()


def kohya_metadata(lora: LoRA, output_name: str) -> dict[str, str]:
    """kohya ``ss_*`` metadata (all strings), plus the LoRA's own non-format metadata."""
    ranks = [m.rank for m in lora.modules.values()]
    alphas = [m.alpha for m in lora.modules.values()]
    conv = [m for m in lora.modules.values() if m.is_conv and m.down.shape[2:] != (1, 1)]
    args = {}
    if conv:
        args = {"conv_dim": str(most_common(m.rank for m in conv)), "conv_alpha": str(most_common(m.alpha for m in conv))}
    meta = {k: v for k, v in lora.metadata.items() if not k.startswith(FORMAT_METADATA_PREFIXES)}
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(most_common(ranks)),
            "ss_network_alpha": f"{most_common(alphas):g}",
            "ss_network_args": json.dumps(args),
            "ss_base_model_version": "sd_v1",
            "ss_v2": "False",
            "ss_output_name": output_name,
            "modelspec.architecture": "stable-diffusion-v1/lora",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.title": output_name,
        }
    )
    return meta


def to_kohya(lora: LoRA, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(lora.modules):
        m, k = lora.modules[name], kohya_name(name)
        tensors[f"{k}.lora_down.weight"] = m.down
        tensors[f"{k}.lora_up.weight"] = m.up
        tensors[f"{k}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return tensors, kohya_metadata(lora, Path(path).stem)
