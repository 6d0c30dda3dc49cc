"""peft ``save_pretrained`` layout (the weights2weights layout): a folder with
``adapter_model.safetensors`` (``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight``)
and ``adapter_config.json`` (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
``target_modules``, ``use_rslora``).

diffusers' SD pipeline loader silently ignores these keys; lorasynth reads them with the
alpha from the ``adapter_config.json`` next to the file. Without that config the alpha is
unknown: the reader warns and assumes alpha = rank (scale 1) unless the caller passes the
alpha (CLI ``--alpha``; a weights2weights LoRA has alpha 27). Paths starting with
``text_model.`` (or, as transformers >= 5 spells them, ``encoder.``) belong to the text
encoder, all others to the UNet.

A peft adapter belongs to one model, so the writer refuses a LoRA that updates both the
UNet and the text encoder (use kohya or diffusers for those). A text-encoder adapter's keys
follow the installed transformers' ``CLIPTextModel`` (``text_model.`` level before
transformers 5, none since), as peft's own ``save_pretrained`` would write them, so
``PeftModel.from_pretrained(text_encoder, folder)`` finds every module.
"""

from __future__ import annotations

import os
from importlib import metadata as _dist
from pathlib import Path

import torch

from lorasynth.errors import FormatError
from lorasynth.core.lora import LoRA
from lorasynth.core.sd15 import file_path
from lorasynth.formats.common import DOWN, UP, check_lora_config, group_factors, make_module, most_common, warn
from lorasynth.core.safe_io import parse_json, read_input_bytes
from lorasynth.formats.diffusers_format import config_alpha, target_name
from lorasynth.formats.keys import ModuleTree, sd15_tree
from lorasynth.formats.metadata import base_model_of, carried_metadata

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 16 * 1024 * 1024
_SUFFIXES = {".lora_A.weight": DOWN, ".lora_B.weight": UP, ".lora_A.default.weight": DOWN, ".lora_B.default.weight": UP}
_TEXT_ROOTS = ("text_model.", "encoder.layers.")


def _parse(key: str) -> tuple[str, str] | None:
    if not key.startswith(PREFIX):
        return None
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            path = key[len(PREFIX) : -len(suffix)]
            if path.startswith(_TEXT_ROOTS):
                return f"text_encoder.{file_path('text_encoder', path)}", part
            return f"unet.{path}", part
    return None


def read_adapter_config(lora_path: Path) -> dict | None:
    """The validated ``adapter_config.json`` beside ``lora_path``, or None if there is none."""
    cfg_path = Path(lora_path).with_name(CONFIG_NAME)
    if not os.path.lexists(cfg_path):
        return None
    # a folder, FIFO or device of that name is refused (one line), never read or silently skipped
    raw = read_input_bytes(cfg_path, "adapter config", MAX_CONFIG_BYTES, FormatError)
    return check_lora_config(parse_json(raw, str(cfg_path)), str(cfg_path))


def read_peft(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str, config: dict | None,
              tree: ModuleTree | None = None, alpha: float | None = None) -> LoRA:
    """``alpha`` (when given) overrides the config's alphas for every module."""
    tree = tree or sd15_tree()
    groups = group_factors(tensors, _parse, source)
    modules = {}
    for name, g in groups.items():
        component, path = name.split(".", 1)
        a = alpha if alpha is not None else config_alpha(config, target_name(component, path), g[DOWN].shape[0])
        modules[name] = make_module(name, g, a, source, tree, name)
    meta = dict(metadata)
    if config is None and alpha is None:
        message = (f"{source}: no {CONFIG_NAME} beside the file: alpha = rank (scale 1) assumed; "
                   "pass the adapter's lora_alpha (CLI: --alpha; weights2weights LoRAs use 27)")
        meta["lorasynth.warning"] = message
        warn(message)
    return LoRA(modules, meta).sorted()


def peft_paths(path: str | Path) -> tuple[Path, Path]:
    """``(weights file, config file)``: ``x.safetensors`` -> its folder's adapter_config.json; a folder -> both inside."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return path, path.with_name(CONFIG_NAME)
    return path / WEIGHTS_NAME, path / CONFIG_NAME


def _text_model_level() -> bool:
    """Whether the installed transformers' CLIPTextModel has the ``text_model.`` level (< 5)."""
    try:
        return int(_dist.version("transformers").split(".")[0]) < 5
    except (_dist.PackageNotFoundError, ValueError):
        return False


def to_peft(lora: LoRA) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """``(tensors, header metadata, adapter_config dict)`` reproducing every module's rank and alpha."""
    components = lora.components
    if len(components) != 1:
        raise FormatError(
            "a peft adapter holds one model's LoRA, but this one updates the UNet and the text encoder; "
            "save it as kohya or diffusers instead"
        )
    component = components.pop()
    keep_level = component != "text_encoder" or _text_model_level()
    tensors = {}
    for name in sorted(lora.modules):
        m = lora.modules[name]
        path = name.split(".", 1)[1]
        if not keep_level:
            path = target_name(component, path)
        tensors[f"{PREFIX}{path}.lora_A.weight"] = m.down
        tensors[f"{PREFIX}{path}.lora_B.weight"] = m.up
    mods = {target_name(component, n.split(".", 1)[1]): m for n, m in lora.modules.items()}
    r = most_common(m.rank for m in mods.values())
    alpha = most_common(m.alpha for m in mods.values())
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model_of(lora.metadata),
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {p: m.rank for p, m in mods.items() if m.rank != r},
        "alpha_pattern": {p: m.alpha for p, m in mods.items() if m.alpha != alpha},
        "target_modules": sorted(mods),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "task_type": None,
        "use_dora": False,
        "use_rslora": False,
    }
    meta = carried_metadata(lora.metadata)
    meta["format"] = "pt"
    return tensors, meta, config
