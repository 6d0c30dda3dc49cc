"""diffusers layout: ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (and ``text_encoder.``).

Alphas live in the header metadata ``lora_adapter_metadata`` as the LoraConfig per
component (``unet.lora_alpha``, ``unet.alpha_pattern``, ``unet.use_rslora``...);
without it alpha = r (scale 1). Also reads the legacy attention-processor keys
(``attn1.processor.to_q_lora.down.weight``, with or without the ``unet.`` prefix, as
``save_attn_procs`` wrote them) and ``.lora.down/.up`` keys.

Text-encoder target names in the metadata are written without the ``text_model.`` level:
diffusers matches them against the text encoder's own module names, which (transformers
>= 5) have no such level, and refuses the adapter otherwise (``NoMatchingPeftModuleError``);
the suffix match peft uses finds them under either transformers spelling.
"""

from __future__ import annotations

import json

import torch

from lorasynth.errors import FormatError
from lorasynth.core.lora import COMPONENTS, LoRA
from lorasynth.core.sd15 import file_path
from lorasynth.formats.common import ALPHA, DOWN, UP, check_lora_config, group_factors, make_module, most_common, tensor_alpha
from lorasynth.core.safe_io import parse_json
from lorasynth.formats.keys import ModuleTree, sd15_tree
from lorasynth.formats.metadata import carried_metadata

METADATA_KEY = "lora_adapter_metadata"
_SUFFIXES = {
    ".lora_A.weight": DOWN,
    ".lora_B.weight": UP,
    ".lora.down.weight": DOWN,
    ".lora.up.weight": UP,
    ".alpha": ALPHA,
}
_LEGACY = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
#: top-level UNet paths: keys starting with these and no component prefix are UNet keys
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.")


def _parse(key: str) -> tuple[str, str] | None:
    if key.startswith(UNET_ROOTS):  # unprefixed attention-processor keys (save_attn_procs)
        key = "unet." + key
    if ".processor." in key:  # legacy attention-processor LoRA
        head, tail = key.split(".processor.", 1)
        for legacy, target in _LEGACY.items():
            for suffix, part in ((".down.weight", DOWN), (".up.weight", UP)):
                if tail == legacy + suffix:
                    return f"{head}.{target}", part
        return None
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def pattern_value(patterns: dict, path: str):
    """peft's rule: a pattern key matches a module path that ends with it at a dot boundary."""
    best = None
    for key, value in patterns.items():
        if path == key or path.endswith("." + key):
            if best is None or len(key) > len(best[0]):
                best = (key, value)
    return None if best is None else best[1]


def config_alpha(config: dict | None, path: str, rank: int) -> float | None:
    """Effective alpha of one module from a (validated) peft LoraConfig dict (None: not configured)."""
    if not config:
        return None
    alpha = pattern_value(config.get("alpha_pattern") or {}, path)
    if alpha is None:
        alpha = config.get("lora_alpha")
    if alpha is None:
        return None
    if config.get("use_rslora"):  # scale alpha/sqrt(r) == alpha' / r
        alpha = alpha * rank**0.5
    return float(alpha)


def _component_configs(metadata: dict[str, str], source: str) -> dict[str, dict]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    where = f"{source}: header metadata {METADATA_KEY}"
    flat = parse_json(raw, where)
    if not isinstance(flat, dict):
        raise FormatError(f"{where} must be a JSON object, got {type(flat).__name__}")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    for component, cfg in configs.items():
        check_lora_config(cfg, f"{where} ({component})")
    return configs


def read_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str,
                   tree: ModuleTree | None = None) -> LoRA:
    tree = tree or sd15_tree()
    groups = group_factors(tensors, _parse, source)
    configs = _component_configs(metadata, source)
    modules = {}
    for key, g in groups.items():
        component, path = key.split(".", 1)
        if component not in COMPONENTS:
            raise FormatError(f"{source}: unknown component in {key}")
        name = f"{component}.{file_path(component, path)}"  # text_encoder.encoder.… -> text_encoder.text_model.encoder.…
        if name in modules:
            raise FormatError(f"{source}: module {name} appears twice")
        if ALPHA in g:
            alpha = tensor_alpha(g[ALPHA], key, source)
        else:
            alpha = config_alpha(configs.get(component), path, g[DOWN].shape[0])
        modules[name] = make_module(key, g, alpha, source, tree, name)
    return LoRA(modules, dict(metadata)).sorted()


def target_name(component: str, path: str) -> str:
    """A module path as a LoraConfig names it: without the text encoder's ``text_model.`` level."""
    if component == "text_encoder" and path.startswith("text_model."):
        return path[len("text_model."):]
    return path


def lora_config_dict(lora: LoRA, component: str) -> dict | None:
    """A peft LoraConfig (as dict) reproducing every module's rank and alpha exactly."""
    mods = {target_name(component, n.split(".", 1)[1]): m for n, m in lora.modules.items() if n.startswith(component + ".")}
    if not mods:
        return None
    r = most_common(m.rank for m in mods.values())
    alpha = most_common(m.alpha for m in mods.values())
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {p: m.rank for p, m in mods.items() if m.rank != r},
        "alpha_pattern": {p: m.alpha for p, m in mods.items() if m.alpha != alpha},
        "target_modules": sorted(mods),
        "use_dora": False,
        "use_rslora": False,
        "lora_bias": False,
    }


def to_diffusers(lora: LoRA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    for name in sorted(lora.modules):
        m = lora.modules[name]
        tensors[f"{name}.lora_A.weight"] = m.down
        tensors[f"{name}.lora_B.weight"] = m.up
    flat = {}
    for component in COMPONENTS:
        cfg = lora_config_dict(lora, component)
        if cfg:
            flat.update({f"{component}.{k}": v for k, v in cfg.items()})
    meta = carried_metadata(lora.metadata)
    meta.update({METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True), "format": "pt"})
    return tensors, meta
