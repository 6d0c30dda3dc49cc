"""LoRA blobs: the canonical bytes of a LoRA, their file names, and how they reach the disk.

A blob is a kohya-layout safetensors file with fixed metadata, written directly
(:func:`encode_blob`) so that equal tensors always give equal bytes and the sha256 of the
bytes names the file (``blobs/<h[:2]>/<h>.safetensors``). :func:`decode_blob` reads the bytes
straight into a :class:`~lorasynth.core.lora.LoRA`. New blobs are staged in ``blobs/tmp``
under a name carrying the writer's host and pid (:func:`stage_blob`), so a leftover of a dead
process can be told apart from a write in progress (:func:`temp_owner_alive`). The rules for
when a staged blob is renamed into place live with :class:`~lorasynth.library.store.Library`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from lorasynth.errors import FormatError, LibraryError
from lorasynth.formats.keys import kohya_name
from lorasynth.core.safe_io import SAFETENSORS_DTYPES, current_umask, read_input_bytes
from lorasynth.core.layout import Layout
from lorasynth.core.lora import LoRA, LoRAModule

BLOB_DIR = "blobs"
TMP_DIR = "tmp"
BLOB_SUFFIX = ".safetensors"
BLOB_METADATA = {"lorasynth.blob": "1"}  # fixed, so equal tensors give equal bytes
#: the largest blob a library reads (an SD1.5 LoRA of rank 256 in float32 is ~600 MB)
MAX_BLOB_BYTES = 4 * 2**30
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")  # a manifest's blob column must be exactly this (it becomes a path)
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"  # in staging temp file names
_TEMP_NAME = re.compile(r"\.blob\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]*\.tmp")


# --------------------------------------------------------------------------- bytes <-> LoRA


# blobs hold float weights only
_TORCH_DTYPES = {name: t for name, t in SAFETENSORS_DTYPES.items() if t.is_floating_point}
_ST_DTYPES = {t: name for name, t in _TORCH_DTYPES.items()}


def _raw(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a 1-D numpy array (bf16 viewed as int16)."""
    if t.dtype not in _ST_DTYPES:
        raise FormatError(f"unsupported LoRA weight dtype {t.dtype} (use float32/float16/bfloat16/float64)")
    t = t.detach().cpu().contiguous().reshape(-1)
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def encode_blob(lora: LoRA) -> tuple[bytes, bool]:
    """``(blob bytes, all weights finite)`` for ``lora``.

    The bytes are a safetensors file in kohya layout (``<kohya name>.lora_down.weight``,
    ``.lora_up.weight``, 0-d float32 ``.alpha``; keys sorted, data in key order, fixed
    metadata), written directly rather than through ``safetensors.torch.save`` (whose
    per-tensor overhead dominated bulk imports). Equal tensors give equal bytes.
    """
    parts: list[tuple[str, str, list[int], np.ndarray]] = []
    for name, m in lora.modules.items():
        k = kohya_name(name)
        parts.append((f"{k}.alpha", "F32", [], np.asarray([m.alpha], dtype=np.float32)))
        parts.append((f"{k}.lora_down.weight", _ST_DTYPES.get(m.down.dtype, "?"), list(m.down.shape), _raw(m.down)))
        parts.append((f"{k}.lora_up.weight", _ST_DTYPES.get(m.up.dtype, "?"), list(m.up.shape), _raw(m.up)))
    parts.sort(key=lambda p: p[0])
    finite = True
    signature = tuple((key, dtype, tuple(shape)) for key, dtype, shape, _ in parts)
    text = _HEADER_CACHE.get(signature)
    if text is None:
        text = _header_bytes(parts)
        if len(_HEADER_CACHE) > 32:
            _HEADER_CACHE.clear()
        _HEADER_CACHE[signature] = text
    by_kind: dict[str, list[np.ndarray]] = {}
    for _, dtype, _, arr in parts:
        by_kind.setdefault(dtype, []).append(arr)
    for dtype, arrs in by_kind.items():
        flat = np.concatenate(arrs)
        if dtype == "BF16":
            flat = torch.from_numpy(flat).view(torch.bfloat16).float().numpy()
        finite = finite and bool(np.isfinite(flat).all())
    return struct.pack("<Q", len(text)) + text + b"".join(arr.tobytes() for _, _, _, arr in parts), finite


_HEADER_CACHE: dict[tuple, bytes] = {}  # every entry of a library has the same header


def _header_bytes(parts) -> bytes:
    header: dict = {}
    offset = 0
    for key, dtype, shape, arr in parts:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    header["__metadata__"] = dict(BLOB_METADATA)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data section to 8 bytes
    # A header length of 0x0280/0x0380/0x0480/0x0580 bytes makes the file's first two bytes
    # look like a pickle protocol marker, which read_safetensors' pickle guard refuses:
    # pad (deterministically) past those values.
    while (len(text) & 0xFF) == 0x80 and 2 <= (len(text) >> 8) & 0xFF <= 5 and len(text) < 1 << 16:
        text += b" " * 8
    return text


def blob_bytes(lora: LoRA) -> bytes:
    """The canonical blob bytes of ``lora`` (see :func:`encode_blob`)."""
    return encode_blob(lora)[0]


def decode_blob(data: bytes, layout: Layout, source: str = "blob") -> LoRA:
    """Read blob bytes straight into a LoRA of ``layout`` (fast path; ``load_lora`` reads them too).

    The tensors are views into one private copy of the data section, so a LoRA costs
    one buffer plus a few Python objects per module.
    """
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        buf = bytearray(data[8 + n :])
        whole: dict[str, torch.Tensor] = {}

        def tensor(key: str, shape) -> torch.Tensor:
            info = header[key]
            start, end = info["data_offsets"]
            kind = info["dtype"]
            size = _TORCH_DTYPES[kind].itemsize
            if list(info["shape"]) != list(shape) or not 0 <= start <= end <= len(buf) or (end - start) != size * math.prod(shape):
                raise ValueError(f"{key}: shape {info['shape']} / bytes {end - start}, layout expects shape {list(shape)}")
            if start % size:  # unaligned: copy this one tensor
                return torch.frombuffer(bytearray(buf[start:end]), dtype=_TORCH_DTYPES[kind], count=(end - start) // size).reshape(tuple(shape))
            if kind not in whole:
                whole[kind] = torch.frombuffer(buf, dtype=_TORCH_DTYPES[kind], count=len(buf) // size)
            return whole[kind][start // size : end // size].view(tuple(shape))

        modules = {}
        for spec in layout.modules:
            k = kohya_name(spec.name)
            info = header[f"{k}.alpha"]
            if info["dtype"] == "F32" and info["shape"] == [] and info["data_offsets"][1] - info["data_offsets"][0] == 4:
                alpha = struct.unpack_from("<f", buf, info["data_offsets"][0])[0]
            else:
                alpha = float(tensor(f"{k}.alpha", info["shape"]).reshape(-1)[0])
            modules[spec.name] = LoRAModule(
                tensor(f"{k}.lora_down.weight", spec.down_shape), tensor(f"{k}.lora_up.weight", spec.up_shape), alpha
            )
    except (KeyError, ValueError, TypeError, IndexError, struct.error, json.JSONDecodeError, RuntimeError, FormatError,
            RecursionError) as e:
        raise LibraryError(f"{source}: unreadable blob: {type(e).__name__}: {str(e)[:200]}") from None
    return LoRA(modules)


# --------------------------------------------------------------------------- names and files


def is_blob_name(value) -> bool:
    """Whether a manifest's blob value is a plain content hash (and so a safe file name)."""
    return isinstance(value, str) and _BLOB_NAME.fullmatch(value) is not None


def temp_owner_alive(name: str) -> bool | None:
    """For a staging temp file: whether the process that wrote it still runs (None: unknown, e.g. other host)."""
    m = _TEMP_NAME.fullmatch(name)
    if m is None or m["host"] != HOST:
        return None
    pid = int(m["pid"])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's process) or cannot tell: keep the file
    return True


def stage_blob(tmp_dir: Path, data: bytes, fsync: bool = True) -> Path:
    """Write blob bytes to a temp file in ``tmp_dir`` (fsynced unless ``fsync=False``); the caller renames it into place."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".blob.{HOST}.{os.getpid()}.", suffix=".tmp", dir=tmp_dir)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # libraries are shared: not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def blob_intact(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a regular file (not a link) holding exactly ``data`` (a FIFO or device is not)."""
    try:
        return read_input_bytes(path, "blob file", len(data), LibraryError, follow_links=False) == data
    except LibraryError:
        return False


def list_blob_files(root: Path) -> tuple[dict[str, Path], list[Path]]:
    """Blob files under ``root/blobs`` by hash, and temp/unexpected files (symlinks are never followed)."""
    blobs, temps = {}, []
    base = root / BLOB_DIR
    for sub in sorted(base.iterdir()) if base.is_dir() and not base.is_symlink() else []:
        if sub.is_symlink() or not sub.is_dir():  # never follow a link out of the library
            temps.append(sub)
            continue
        for f in sub.iterdir():
            if sub.name != TMP_DIR and f.suffix == BLOB_SUFFIX and f.name.startswith(sub.name) and not f.name.startswith("."):
                blobs[f.name[: -len(BLOB_SUFFIX)]] = f
            else:
                temps.append(f)
    return blobs, temps
