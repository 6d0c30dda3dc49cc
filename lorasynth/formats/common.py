"""Shared step of every reader: group tensor keys into (down, up, alpha) per module."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import FormatError
from ..lora import LoRAModule
from .keys import some

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


def make_module(name: str, group: dict[str, torch.Tensor], alpha: float | None, source: str) -> LoRAModule:
    """Build and validate one module; ``alpha`` None means alpha = rank (scale 1)."""
    down, up = group[DOWN], group[UP]
    if not down.is_floating_point() or not up.is_floating_point():
        raise FormatError(f"{source}: module {name} has non-float weights ({down.dtype}, {up.dtype})")
    try:
        m = LoRAModule(down, up, alpha if alpha is not None else down.shape[0])
    except FormatError as e:
        raise FormatError(f"{source}: module {name}: {e}") from None
    return m


def tensor_alpha(t: torch.Tensor, name: str, source: str) -> float:
    if t.numel() != 1:
        raise FormatError(f"{source}: alpha of {name} must be a scalar, got shape {tuple(t.shape)}")
    return float(t.reshape(()).item())


def most_common(values) -> float:
    values = list(values)
    return max(set(values), key=values.count)
