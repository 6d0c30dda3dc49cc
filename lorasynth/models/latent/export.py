"""Reading an exported model part: ``<kind>.json`` + ``<kind>.safetensors``, never a pickle.

A loader gets its files through a *reader* (``read(name) -> bytes``): :func:`file_reader` reads a
folder (regular files only, bounded), and a model folder passes one that returns bytes already
checked against the SHA-256 recorded in ``lorasynth_model.json``
(:meth:`lorasynth.models.model_folder.SynthesisModel.read_part`). Either way the bytes that are
parsed are the bytes that were checked: nothing is opened twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from lorasynth.errors import ModelError
from lorasynth.core.safe_io import MAX_JSON_BYTES, parse_json, read_input_bytes, safetensors_from_bytes

#: the largest weight file a model part may hold (a w2w-size VAE is ~50 MB)
MAX_PART_BYTES = 16 * 2**30

Reader = Callable[[str], "bytes | bytearray"]


def file_reader(path: str | Path) -> Reader:
    """A reader of the files in folder ``path``: regular files only, bounded; one ModelError line otherwise."""
    path = Path(path)

    def read(name: str) -> bytes | bytearray:
        limit = MAX_JSON_BYTES if name.endswith(".json") else MAX_PART_BYTES
        return read_input_bytes(path / name, name, limit, ModelError, mutable=True)

    return read


def read_export(path: str | Path, meta_file: str, weights_file: str, what: str, fmt: str, version: int | tuple[int, ...],
                device: str | torch.device = "cpu", read: Reader | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of an exported model, or a ModelError saying what is wrong.

    ``version``: the format version the loader reads, or a tuple of the versions it still reads
    (the newest last); ``meta["version"]`` tells the caller which one the file is."""
    versions = (version,) if isinstance(version, int) else tuple(version)
    path = Path(path)
    if read is None:
        for name in (meta_file, weights_file):
            if not os.path.lexists(path / name):
                raise ModelError(f"no {what} in {path}: {name} is missing")
        read = file_reader(path)
    meta = parse_json(read(meta_file), f"{path / meta_file} ({what} config)", error=ModelError)
    found = meta.get("version")
    if meta.get("format") != fmt or isinstance(found, bool) or found not in versions:
        shown = " or ".join(str(v) for v in versions)
        raise ModelError(f"{path / meta_file} is not a lorasynth {what} (version {shown})")
    tensors, _ = safetensors_from_bytes(read(weights_file), path / weights_file, error=ModelError)
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return meta, tensors
