"""peft ``save_pretrained`` layout: ``base_model.model.<path>.lora_A.weight`` + adapter_config.json.

diffusers' SD pipeline loader silently ignores these keys; lorasynth reads them with the
alpha from the ``adapter_config.json`` next to the file (r, lora_alpha, alpha_pattern,
use_rslora). Paths starting with ``text_model.`` belong to the text encoder, all
others to the UNet.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import FormatError
from ..lora import LoRA
from .common import DOWN, UP, group_factors, make_module
from .diffusers_format import config_alpha

PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": DOWN, ".lora_B.weight": UP, ".lora_A.default.weight": DOWN, ".lora_B.default.weight": UP}


def _parse(key: str) -> tuple[str, str] | None:
    if not key.startswith(PREFIX):
        return None
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            path = key[len(PREFIX) : -len(suffix)]
            component = "text_encoder" if path.startswith("text_model.") else "unet"
            return f"{component}.{path}", part
    return None


def read_adapter_config(lora_path: Path) -> dict | None:
    cfg_path = Path(lora_path).with_name("adapter_config.json")
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError:
        raise FormatError(f"{cfg_path}: not valid JSON") from None
    if cfg.get("use_dora"):
        raise FormatError(f"{cfg_path}: DoRA (use_dora) is not supported")
    return cfg


def read_peft(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str, config: dict | None) -> LoRA:
    groups = group_factors(tensors, _parse, source)
    modules = {}
    for name, g in groups.items():
        path = name.split(".", 1)[1]
        modules[name] = make_module(name, g, config_alpha(config, path, g[DOWN].shape[0]), source)
    meta = dict(metadata)
    if config is None:
        meta["lorasynth.warning"] = "no adapter_config.json beside the file: alpha = rank (scale 1) assumed"
    return LoRA(modules, meta).sorted()
