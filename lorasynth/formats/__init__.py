"""Read and write SD1.5 LoRA files: kohya, diffusers and peft layouts, auto-detected.

    lora = load_lora("x.safetensors")            # any supported layout -> canonical LoRA
    save_lora(lora, "y.safetensors", "kohya")    # atomic write; kohya (default), diffusers or peft

Every module a file names is checked against the base model's module tree (SD1.5 by
default): it must exist there, with the weight shape its factors update, and rank >= 1.
Readers that skip part of a file or assume something emit a :class:`FormatWarning`.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorasynth.errors import FormatError
from lorasynth.core.lora import LoRA
from lorasynth.formats.common import FormatWarning
from lorasynth.formats.detect import DIFFUSERS, FORMATS, KOHYA, PEFT, detect_format
from lorasynth.formats.diffusers_format import read_diffusers, to_diffusers
from lorasynth.formats.keys import ModuleTree, sd15_tree
from lorasynth.formats.kohya import read_kohya, to_kohya
from lorasynth.formats.metadata import INFERRED_KEYS, carried_metadata, merged_metadata, safetensors_hashes, synthesized_metadata
from lorasynth.formats.peft_format import WEIGHTS_NAME, peft_paths, read_adapter_config, read_peft, to_peft
from lorasynth.core.safe_io import read_safetensors, write_safetensors, write_text

SAVE_FORMATS = (KOHYA, DIFFUSERS, PEFT)

__all__ = [
    "load_lora", "save_lora", "detect_file_format", "FORMATS", "SAVE_FORMATS", "ModuleTree", "sd15_tree",
    "FormatWarning", "INFERRED_KEYS", "carried_metadata", "merged_metadata", "synthesized_metadata",
]


def _weights_file(path: Path) -> Path:
    """A peft adapter folder stands for its ``adapter_model.safetensors``."""
    if path.is_dir() and (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    return path


def detect_file_format(path: str | os.PathLike) -> str:
    path = _weights_file(Path(path))
    tensors, _ = read_safetensors(path)
    return detect_format(tensors, str(path))


def load_lora(path: str | os.PathLike, tree: ModuleTree | None = None, check_finite: bool = True,
              alpha: float | None = None) -> LoRA:
    """Load a LoRA file (or a peft adapter folder) of any supported layout into the canonical object.

    ``tree`` resolves kohya names and checks every module's shape (SD1.5 by default; pass
    ``apply.pipeline_tree(pipe)`` for another base model). ``alpha`` sets the alpha of a peft
    adapter (overriding its adapter_config.json, required in effect when that is missing);
    it is ignored for kohya and diffusers files, which carry their alphas. The file's format is
    recorded in ``metadata['lorasynth.source_format']``. NaN/Inf weights raise FormatError.
    """
    path = _weights_file(Path(path))
    tensors, metadata = read_safetensors(path)
    fmt = detect_format(tensors, str(path))
    if fmt == KOHYA:
        lora = read_kohya(tensors, metadata, str(path), tree)
    elif fmt == DIFFUSERS:
        lora = read_diffusers(tensors, metadata, str(path), tree)
    else:
        config = read_adapter_config(path)
        lora = read_peft(tensors, metadata, str(path), config, tree, alpha)
    if not lora.modules:
        raise FormatError(f"{path}: holds no LoRA modules")
    if check_finite:
        try:
            lora.check_finite()
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
    lora.metadata["lorasynth.source_format"] = fmt
    return lora


def _with_hashes(tensors, metadata: dict[str, str]) -> dict[str, str]:
    model_hash, legacy_hash = safetensors_hashes(tensors, metadata)
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def save_lora(lora: LoRA, path: str | os.PathLike, fmt: str = KOHYA) -> Path:
    """Write ``lora`` atomically; returns the weights file written.

    ``kohya`` (default: loads in A1111, ComfyUI and diffusers, one alpha per file),
    ``diffusers`` (``pytorch_lora_weights`` layout with ``lora_adapter_metadata``) or ``peft``
    (``adapter_model.safetensors`` + ``adapter_config.json``: ``path`` is the folder, or the
    ``.safetensors`` file whose folder gets the config). Source metadata (``ss_*``,
    ``modelspec.*``, ...) is kept; format keys and the ``sshs_*`` hashes are regenerated.
    """
    if fmt not in SAVE_FORMATS:
        raise FormatError(f"cannot save as {fmt!r}; choose one of {', '.join(SAVE_FORMATS)}")
    if not lora.modules:
        raise FormatError("cannot save a LoRA without modules")
    empty = [n for n, m in lora.modules.items() if m.rank < 1]
    if empty:
        raise FormatError(f"cannot save modules of rank 0: {', '.join(sorted(empty)[:3])}")
    lora.check_finite()
    if fmt == PEFT:
        import json

        weights, config_path = peft_paths(path)
        tensors, metadata, config = to_peft(lora)
        write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return write_safetensors(tensors, weights, _with_hashes(tensors, metadata))
    tensors, metadata = to_kohya(lora, Path(path)) if fmt == KOHYA else to_diffusers(lora)
    return write_safetensors(tensors, path, _with_hashes(tensors, metadata))
