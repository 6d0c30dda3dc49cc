"""Shared steps of every reader: group tensor keys into (down, up, alpha) per module, build and
check modules against the base model's module tree, and validate peft-style LoRA configs."""

from __future__ import annotations

import json
import math
import warnings
from typing import Callable

import torch

from lorasynth.errors import FormatError
from lorasynth.core.lora import LoRAModule
from lorasynth.formats.keys import ModuleTree, some


class FormatWarning(UserWarning):
    """A file was read, but not all of it, or with an assumption the user should know about."""


def warn(message: str) -> None:
    warnings.warn(message, FormatWarning, stacklevel=3)

# part names a format's key parser returns
DOWN, UP, ALPHA = "down", "up", "alpha"


def group_factors(
    tensors: dict[str, torch.Tensor],
    parse: Callable[[str], tuple[str, str] | None],
    source: str,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{module key: {'down': t, 'up': t, 'alpha': t?}}`` using ``parse(key) -> (module, part)``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        parsed = parse(key)
        if parsed is None:
            unknown.append(key)
            continue
        module, part = parsed
        groups.setdefault(module, {})[part] = t
    if unknown:
        raise FormatError(f"{source}: unrecognized LoRA keys: {some(unknown)}")
    incomplete = [m for m, g in groups.items() if DOWN not in g or UP not in g]
    if incomplete:
        raise FormatError(f"{source}: modules missing their down or up weight: {some(incomplete)}")
    return groups


def make_module(
    name: str, group: dict[str, torch.Tensor], alpha: float | None, source: str,
    tree: ModuleTree | None = None, module: str | None = None,
) -> LoRAModule:
    """Build and validate one module; ``alpha`` None means alpha = rank (scale 1).

    With ``tree``, the canonical ``module`` name must exist there with the weight shape the
    factors update (a LoRA for another model, or a crafted file, is refused by name).
    """
    down, up = group[DOWN], group[UP]
    if not down.is_floating_point() or not up.is_floating_point():
        raise FormatError(f"{source}: module {name} has non-float weights ({down.dtype}, {up.dtype})")
    if down.ndim >= 1 and down.shape[0] == 0:
        raise FormatError(f"{source}: module {name} has rank 0 (empty factors); a LoRA module needs rank >= 1")
    try:
        m = LoRAModule(down, up, alpha if alpha is not None else down.shape[0])
    except FormatError as e:
        raise FormatError(f"{source}: module {name}: {e}") from None
    if tree is not None:
        tree.check(module or name, m.weight_shape, source)
    return m


def _number(value, what: str, where: str, integer: bool = False) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        kind = "an integer" if integer else "a finite number"
        raise FormatError(f"{where}: {what} must be {kind}, got {json.dumps(value)[:60]}")
    return value


def check_lora_config(cfg, where: str) -> dict:
    """Validate a peft ``LoraConfig`` dict (adapter_config.json, diffusers metadata) field by field.

    Only the fields lorasynth uses are checked (``r``, ``lora_alpha``, ``rank_pattern``,
    ``alpha_pattern``, ``use_rslora``, ``use_dora``, ``target_modules``); each bad one is a
    one-line FormatError naming the field.
    """
    if not isinstance(cfg, dict):
        raise FormatError(f"{where}: must be a JSON object (a LoraConfig), got {type(cfg).__name__}")
    if cfg.get("r") is not None and _number(cfg["r"], "r", where, integer=True) < 1:
        raise FormatError(f"{where}: r must be >= 1, got {cfg['r']}")
    if cfg.get("lora_alpha") is not None:
        _number(cfg["lora_alpha"], "lora_alpha", where)
    for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = cfg.get(field)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise FormatError(f"{where}: {field} must be a JSON object, got {type(pattern).__name__}")
        for key, value in pattern.items():
            _number(value, f"{field}[{key!r}]", where, integer)
    for flag in ("use_rslora", "use_dora"):
        if cfg.get(flag) is not None and not isinstance(cfg[flag], bool):
            raise FormatError(f"{where}: {flag} must be true or false, got {json.dumps(cfg[flag])[:60]}")
    if cfg.get("use_dora"):
        raise FormatError(f"{where}: DoRA (use_dora) is not supported")
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        raise FormatError(f"{where}: target_modules must be a list or a string")
    return cfg


def tensor_alpha(t: torch.Tensor, name: str, source: str) -> float:
    if t.numel() != 1:
        raise FormatError(f"{source}: alpha of {name} must be a scalar, got shape {tuple(t.shape)}")
    return float(t.reshape(()).item())


def most_common(values) -> float:
    values = list(values)
    return max(set(values), key=values.count)
