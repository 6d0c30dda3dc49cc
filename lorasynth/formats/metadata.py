"""Header metadata in the community's conventions (kohya ``ss_*``, SAI ``modelspec.*``, A1111 hashes).

Which keys a writer regenerates from the tensors, which it carries over from the source file
(``convert`` and ``blend`` keep the source's ``ss_*``/``modelspec.*``), and the builders for
what lorasynth adds: a trigger phrase on synthesized LoRAs, the base model, ``merged_from`` on
blends, and the hashes A1111 / sd-webui-additional-networks show (``sshs_model_hash``: sha256
of the data section; ``sshs_legacy_hash``: 8 hex digits of the sha256 of 64 KiB at offset 1 MiB
of the file written with only its ``ss_*`` metadata, as kohya's
``precalculate_safetensors_hashes`` computes them).

    lora.metadata.update(synthesized_metadata("sks person", base_model="runwayml/stable-diffusion-v1-5"))
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lorasynth.core.safe_io import open_input, parse_json, safetensors_bytes
from lorasynth.errors import FormatError

#: Default trigger phrase of lorasynth's identity LoRAs (the w2w DreamBooth prompt is "a photo of sks person").
DEFAULT_TRIGGER = "sks person"
#: What the readers add to ``LoRA.metadata`` (inferred, not from the file); writers drop them.
INFERRED_KEYS = ("lorasynth.source_format", "lorasynth.warning")
#: Keys every writer derives from the tensors (never carried over from a source file).
WRITER_KEYS = frozenset({
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version", "ss_v2",
    "sshs_model_hash", "sshs_legacy_hash", "modelspec.architecture", "modelspec.sai_model_spec",
    "modelspec.hash_sha256", "lora_adapter_metadata", "format", "lorasynth.placeholder_modules",
})
TRIGGER_KEY = "modelspec.trigger_phrase"
TAG_FREQUENCY_KEY = "ss_tag_frequency"
MERGED_FROM_KEY = "modelspec.merged_from"
BASE_MODEL_KEYS = ("ss_sd_model_name", "lorasynth.base_model")


def carried_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The source's metadata a writer keeps: everything but writer-derived and reader-inferred keys."""
    return {k: str(v) for k, v in metadata.items() if k not in WRITER_KEYS and k not in INFERRED_KEYS}


def trigger_metadata(trigger_phrase: str) -> dict[str, str]:
    """``modelspec.trigger_phrase`` and kohya's ``ss_tag_frequency`` (what A1111/Civitai show as tags)."""
    return {TRIGGER_KEY: trigger_phrase, TAG_FREQUENCY_KEY: json.dumps({"lorasynth": {trigger_phrase: 1}})}


def synthesized_metadata(trigger_phrase: str = DEFAULT_TRIGGER, base_model: str | None = None,
                         title: str | None = None) -> dict[str, str]:
    """Metadata for a synthesized identity LoRA: trigger phrase, base model, usage hint, title."""
    meta = trigger_metadata(trigger_phrase)
    meta["modelspec.usage_hint"] = f'use the trigger phrase in the prompt, e.g. "a photo of {trigger_phrase}"'
    if base_model:
        meta["ss_sd_model_name"] = str(base_model)
    if title:
        meta["modelspec.title"] = title
    return meta


def _tag_frequency(raw: str | None) -> dict[str, dict[str, int]]:
    try:
        value = parse_json(raw, "ss_tag_frequency") if raw else {}
    except FormatError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(d): {str(t): c for t, c in tags.items() if isinstance(c, int) and not isinstance(c, bool)}
            for d, tags in value.items() if isinstance(tags, dict)}


def merged_metadata(sources: Sequence[tuple[str, Mapping[str, str]]]) -> dict[str, str]:
    """Metadata of a blend of ``[(source name, its metadata), ...]``.

    ``modelspec.merged_from`` lists the sources (comma-separated, as kohya's merge scripts
    write it); ``ss_*``/``modelspec.*`` values all sources agree on are kept; trigger phrases
    and tag frequencies are united, so the blend still names every trigger it needs.
    """
    carried = [carried_metadata(meta) for _, meta in sources]
    out: dict[str, str] = {}
    if carried:
        shared = set(carried[0]).intersection(*carried[1:])
        for key in sorted(shared):
            if key.startswith(("ss_", "modelspec.")) and all(c[key] == carried[0][key] for c in carried):
                out[key] = carried[0][key]
    triggers: list[str] = []
    for c in carried:
        for phrase in c.get(TRIGGER_KEY, "").split(","):
            if phrase.strip() and phrase.strip() not in triggers:
                triggers.append(phrase.strip())
    if triggers:
        out[TRIGGER_KEY] = ", ".join(triggers)
    freq: dict[str, dict[str, int]] = {}
    for c in carried:
        for folder, tags in _tag_frequency(c.get(TAG_FREQUENCY_KEY)).items():
            for tag, count in tags.items():
                freq.setdefault(folder, {})[tag] = freq.get(folder, {}).get(tag, 0) + count
    if freq:
        out[TAG_FREQUENCY_KEY] = json.dumps(freq)
    out.pop("modelspec.title", None)
    out.pop("ss_output_name", None)
    out[MERGED_FROM_KEY] = ", ".join(name for name, _ in sources)
    return out


def base_model_of(metadata: Mapping[str, str]) -> str | None:
    for key in BASE_MODEL_KEYS:
        if metadata.get(key):
            return metadata[key]
    return None


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya's ``precalculate_safetensors_hashes``.

    The model hash is the sha256 of the data section (A1111's "addnet" hash of a LoRA: its
    first 12 digits are what ``Lora hashes`` shows); it does not depend on the metadata.
    """
    raw = safetensors_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (n,) = struct.unpack("<Q", raw[:8])
    model_hash = hashlib.sha256(memoryview(raw)[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(memoryview(raw)[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _sha256_from(path: str | os.PathLike, offset: int | None) -> str:
    """SHA-256 of a regular file from ``offset`` (None: after a safetensors header), up to its size."""
    h = hashlib.sha256()
    with open_input(path, "file") as (f, size):
        if offset is None:
            head = f.read(8)
            offset = 8 + struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        f.seek(min(offset, size))
        left = max(0, size - offset)
        while left > 0 and (chunk := f.read(min(1 << 20, left))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def lora_file_hash(path: str | os.PathLike) -> str:
    """A1111's hash of a LoRA file: sha256 of a safetensors file's data section (the whole file otherwise)."""
    path = Path(path)
    return _sha256_from(path, None if path.suffix.lower() == ".safetensors" else 0)


def model_file_hash(path: str | os.PathLike) -> str:
    """A1111's checkpoint hash: sha256 of the whole file (infotext shows the first 10 digits)."""
    return _sha256_from(path, 0)
