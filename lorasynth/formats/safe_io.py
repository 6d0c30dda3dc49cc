"""Safe reading and atomic writing of safetensors files.

Everything lorasynth reads from outside goes through :func:`read_safetensors`: it
refuses pickles (``torch.save`` zips, raw pickles, ``.ckpt``/``.pt``/``.bin``) without
unpickling them, validates the header before safetensors parses it (size bound,
JSON, offsets inside the file) and turns every failure into one clear FormatError.
Every write is atomic: a temp file in the target folder, fsync, then ``os.replace``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.numpy import save as save_numpy
from safetensors.torch import load_file, save

from ..errors import FormatError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
#: safetensors dtype names -> the torch dtypes a buffer can be viewed as (other names, e.g. fp8,
#: are left to safetensors' own loader); sizes come from ``itemsize``.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_NUMPY_DTYPES = set(SAFETENSORS_DTYPES.values()) - {torch.bfloat16}  # numpy has no bfloat16


def _looks_pickled(head: bytes) -> bool:
    """A torch.save zip, or a raw pickle (PROTO opcode 0x80 + version 2..5).

    A safetensors file whose header length is 0x280/0x380/... also starts with 0x80 0x02..5,
    so a raw pickle is only assumed when byte 8 is not the ``{`` that opens a header.
    """
    if head.startswith(b"PK\x03\x04"):
        return True
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[8:9] != b"{"


def _check_framing(path: Path, size: int, head: bytes) -> int:
    """Refuse pickles and non-safetensors framing; return the header length."""
    if _looks_pickled(head) or path.suffix.lower() in PICKLE_SUFFIXES:
        raise FormatError(
            f"{path}: looks like a pickled PyTorch checkpoint; lorasynth never unpickles LoRA files "
            "(they can run code). Convert it to .safetensors with a tool you trust."
        )
    if len(head) < 8:
        raise FormatError(f"{path}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: not a safetensors file, or a hostile one: header claims {n} bytes (limit {MAX_HEADER_BYTES})")
    if n > size - 8:
        raise FormatError(f"{path}: not a safetensors file, or truncated (header of {n} bytes, file {size} bytes)")
    return n


def _parse_header(path: Path, raw: bytes, data_len: int) -> tuple[dict, dict[str, str]]:
    """Parse and check the JSON header against the data section's length."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not a safetensors file (header is not JSON: {e.msg if hasattr(e, 'msg') else e})")
    if not isinstance(header, dict):
        raise FormatError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: malformed safetensors metadata (not a JSON object)")
    for key, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
            dims = [int(d) for d in shape]
            start, end = int(start), int(end)
        except (TypeError, KeyError, ValueError):
            raise FormatError(f"{path}: malformed safetensors entry for {key!r}")
        if any(d < 0 for d in dims):
            raise FormatError(f"{path}: tensor {key!r} has a negative dimension {shape}")
        count = math.prod(dims)
        if end > data_len or start > end or start < 0:
            raise FormatError(f"{path}: truncated file: tensor {key!r} ends at byte {end}, data holds {data_len}")
        if dtype in SAFETENSORS_DTYPES and count * SAFETENSORS_DTYPES[dtype].itemsize != end - start:
            raise FormatError(f"{path}: tensor {key!r} size does not match its shape {shape} and dtype {dtype}")
    return header, {str(k): str(v) for k, v in metadata.items()}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the string metadata of a validated safetensors file.

    Raises FormatError for pickles, non-safetensors data, an oversized or invalid
    header, and truncated files. Never unpickles anything.

    The file is read once into one buffer and every tensor is a view of it (LoRA files are
    small; this is ~2x faster than safetensors' per-tensor loader for a few hundred tensors).
    Dtypes torch has no plain mapping for go through safetensors' own loader.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = _check_framing(path, size, f.read(9))
        f.seek(8)
        raw = f.read(n)
        header, metadata = _parse_header(path, raw, size - 8 - n)
        if any(e["dtype"] not in SAFETENSORS_DTYPES for e in header.values()):
            return _read_with_safetensors(path), metadata
        data = bytearray(size - 8 - n)
        if f.readinto(data) != len(data):
            raise FormatError(f"{path}: file changed while reading")
    tensors = {}
    for key, entry in header.items():
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        start, end = entry["data_offsets"]
        if start == end:
            tensors[key] = torch.empty(entry["shape"], dtype=dtype)
            continue
        source = data if start % dtype.itemsize == 0 else bytearray(data[start:end])  # keep elements aligned
        offset = start if source is data else 0
        tensors[key] = torch.frombuffer(source, dtype=dtype, count=(end - start) // dtype.itemsize, offset=offset).view(entry["shape"])
    return tensors, metadata


def _read_with_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise FormatError(f"{path}: cannot read safetensors data: {e}") from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize to safetensors bytes, deterministically.

    safetensors writes its header from a hash map, so the key order (and the file bytes)
    can change between runs; the header is re-serialized here with sorted keys so the same
    tensors and metadata always give the same bytes (reproducible synthesis, stable hashes).
    """
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if all(v.dtype in _NUMPY_DTYPES for v in clean.values()):
        # same bytes; safetensors' numpy writer costs ~15 us a tensor, its torch writer ~45 us
        raw = save_numpy({k: v.numpy() for k, v in clean.items()}, metadata=meta)
    else:  # bfloat16, float8: numpy has no such dtype
        raw = save(clean, metadata=meta)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + raw[8 + n :]


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors atomically and deterministically (metadata values must be strings)."""
    return write_bytes(path, safetensors_bytes(tensors, metadata))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a binary file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
