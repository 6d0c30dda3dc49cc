"""Read and write SD1.5 LoRA files: kohya, diffusers and peft layouts, auto-detected.

    lora = load_lora("x.safetensors")            # any supported layout -> canonical LoRA
    save_lora(lora, "y.safetensors", "kohya")    # atomic write; kohya (default) or diffusers
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FormatError
from ..lora import LoRA
from .detect import DIFFUSERS, FORMATS, KOHYA, PEFT, detect_format
from .diffusers_format import read_diffusers, to_diffusers
from .keys import ModuleTree, sd15_tree
from .kohya import read_kohya, to_kohya
from .peft_format import read_adapter_config, read_peft
from .safe_io import read_safetensors, write_safetensors

SAVE_FORMATS = (KOHYA, DIFFUSERS)

__all__ = ["load_lora", "save_lora", "detect_file_format", "FORMATS", "SAVE_FORMATS", "ModuleTree", "sd15_tree"]


def detect_file_format(path: str | os.PathLike) -> str:
    tensors, _ = read_safetensors(path)
    return detect_format(tensors, str(path))


def load_lora(path: str | os.PathLike, tree: ModuleTree | None = None, check_finite: bool = True) -> LoRA:
    """Load a LoRA file of any supported layout into the canonical object.

    ``tree`` resolves kohya names (SD1.5 by default). The file's format is recorded in
    ``metadata['lorasynth.source_format']``. NaN/Inf weights raise FormatError.
    """
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    fmt = detect_format(tensors, str(path))
    if fmt == KOHYA:
        lora = read_kohya(tensors, metadata, str(path), tree)
    elif fmt == DIFFUSERS:
        lora = read_diffusers(tensors, metadata, str(path))
    else:
        lora = read_peft(tensors, metadata, str(path), read_adapter_config(path))
    if check_finite:
        try:
            lora.check_finite()
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
    lora.metadata["lorasynth.source_format"] = fmt
    return lora


def save_lora(lora: LoRA, path: str | os.PathLike, fmt: str = KOHYA) -> Path:
    """Write ``lora`` atomically as ``kohya`` (default: loads in A1111, ComfyUI, diffusers) or ``diffusers``."""
    if fmt not in SAVE_FORMATS:
        raise FormatError(f"cannot save as {fmt!r}; choose one of {', '.join(SAVE_FORMATS)}")
    lora.check_finite()
    tensors, metadata = to_kohya(lora, Path(path)) if fmt == KOHYA else to_diffusers(lora)
    metadata.pop("lorasynth.source_format", None)
    return write_safetensors(tensors, path, metadata)
