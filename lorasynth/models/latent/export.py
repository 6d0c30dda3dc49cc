"""Reading an exported latent model: ``<kind>.json`` + ``<kind>.safetensors``, never a pickle."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lorasynth.errors import ModelError
from lorasynth.core.safe_io import read_json


def read_export(path: str | Path, meta_file: str, weights_file: str, what: str, fmt: str, version: int,
                device: str | torch.device = "cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of an exported model, or a ModelError saying what is wrong."""
    path = Path(path)
    if not (path / meta_file).exists():
        raise ModelError(f"no {what} in {path}: {meta_file} is missing")
    meta = read_json(path / meta_file, f"{what} config", error=ModelError)
    try:
        tensors = load_file(str(path / weights_file), device=str(device))
    except FileNotFoundError as e:
        raise ModelError(f"no {what} in {path}: {Path(e.filename).name} is missing") from None
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelError(f"{what} in {path} is unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or meta.get("version") != version:
        raise ModelError(f"{path / meta_file} is not a lorasynth {what} (version {version})")
    return meta, tensors
