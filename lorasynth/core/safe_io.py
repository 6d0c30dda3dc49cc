"""Safe reading and atomic writing: the one door every untrusted file comes through.

Reading. :func:`read_safetensors` refuses pickles (``torch.save`` zips, raw pickles,
``.ckpt``/``.pt``/``.bin``) without unpickling them and validates the whole header with
:func:`parse_safetensors_header` before any tensor is built: bounded size and JSON nesting,
the type of every field, a dtype from the known set, finite non-negative integer dims, and
integer offsets that tile the data section exactly (no overlap, no gap, no trailing
bytes) - the rules of the reference ``safe_open``, and stricter on types. Every JSON the
project reads back (packs, libraries, model folders, configs) goes through
:func:`read_json` / :func:`parse_json` (UTF-8, bounded nesting, no duplicate keys, the
expected top-level type). Every failure is one clear :class:`FormatError` line; a
directory, FIFO, device, link (where none is expected) or unreadable file is named as such, and
every file is checked on the open descriptor and read up to its size, never beyond
(:mod:`lorasynth.core.input_files`: :func:`open_input`, :func:`read_input_bytes`).

Writing. Every output goes through :func:`atomic_path` (or :func:`atomic_write`,
:func:`write_bytes`, :func:`write_text`, :func:`write_json`): a temp file in the target
folder, fsync, ``os.replace``, the folder fsynced; the file gets the mode a plain
``open()`` would give it (``0o666 & ~umask``, or the mode of the file it replaces).
An unwritable target (a path under a regular file, an existing directory, a read-only
folder, a full disk) is one :class:`OutputError` line and leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
import torch
from safetensors.numpy import save as save_numpy
from safetensors.torch import save

from lorasynth.errors import FormatError, OutputError
from lorasynth.core.input_files import (check_input_file, copy_input, input_sha256, kind_problem, open_input,  # noqa: F401
                                        read_input_bytes)  # re-exported: safe_io is the one door for reads

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_JSON_DEPTH = 64  # no file lorasynth reads nests deeper than a few levels
MAX_JSON_BYTES = 64 * 1024 * 1024  # configs, packs, model folders: kilobytes in practice
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
#: safetensors dtype names -> the torch dtypes a buffer can be viewed as (other names, e.g. fp8,
#: are left to safetensors' own loader); sizes come from ``itemsize``.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
#: every dtype name a safetensors header may use, with its element size in bytes
DTYPE_SIZES = {
    **{name: t.itemsize for name, t in SAFETENSORS_DTYPES.items()},
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}
_NUMPY_DTYPES = set(SAFETENSORS_DTYPES.values()) - {torch.bfloat16}  # numpy has no bfloat16


# --------------------------------------------------------------------------- input files
# check_input_file, open_input, read_input_bytes, input_sha256, copy_input: lorasynth.core.input_files


# --------------------------------------------------------------------------- JSON


_KEEP = b'[]{}"'
_DROP = bytes(c for c in range(256) if c not in _KEEP)
_OPEN, _CLOSE = np.zeros(256, np.int8), np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_CLOSE[[ord("]"), ord("}")]] = 1


def json_depth(raw: bytes | str) -> int:
    """The deepest bracket nesting of a JSON text (strings skipped), in a few C-speed passes.

    Lets deep nesting be refused *before* ``json.loads`` recurses into it. Escaped backslashes
    and quotes are dropped first, then everything but brackets and quotes, then the strings.
    (For invalid JSON the count may be off; ``json.loads`` then refuses the text anyway.)
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    raw = bytes(raw)
    if b"[" not in raw and b"{" not in raw:
        return 0
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(raw.translate(None, _DROP).split(b'"')[0::2])
    arr = np.frombuffer(brackets, dtype=np.uint8)
    steps = _OPEN[arr].astype(np.int32) - _CLOSE[arr]
    return int(np.cumsum(steps).max(initial=0))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _type_name(t) -> str:
    names = {dict: "a JSON object", list: "a JSON array", str: "a string", int: "an integer", float: "a number",
             bool: "true/false", type(None): "null"}
    if isinstance(t, tuple):
        return " or ".join(names.get(x, x.__name__) for x in t)
    return names.get(t, t.__name__)


def parse_json(raw: bytes | str, what: str, expect: type | tuple[type, ...] | None = dict,
               max_depth: int = MAX_JSON_DEPTH, error: type[Exception] = FormatError, invalid: str = "not valid JSON",
               unique_keys: bool = True):
    """Parse an untrusted JSON text strictly; ``what`` names it in the one-line error.

    UTF-8 only, nesting at most ``max_depth`` (checked before parsing), no duplicate keys,
    and a top-level value of type ``expect`` (``None``: any). ``unique_keys=False`` skips the
    duplicate-key check (faster; for formats whose own checks catch a repeated key).
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{what}: not UTF-8 text (bad byte at offset {e.start})") from None
    else:
        text = raw
    text = text.removeprefix("\ufeff")
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{what}: JSON nested {depth} levels deep (limit {max_depth}); refusing it")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates) if unique_keys else json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what}: {invalid} ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError, UnicodeError) as e:  # duplicate keys, 5000-digit integers, lone surrogates
        raise error(f"{what}: {invalid} ({e})") from None
    if expect is not None:
        expected = expect if isinstance(expect, tuple) else (expect,)
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            raise error(f"{what}: expected {_type_name(expect)}, got {_type_name(type(value))}")
    return value


def read_json(path: str | os.PathLike, what: str | None = None, expect: type | tuple[type, ...] | None = dict,
              max_bytes: int = MAX_JSON_BYTES, error: type[Exception] = FormatError):
    """Read and :func:`parse_json` a JSON file; every problem is one ``error`` line naming ``path``."""
    path = Path(path)
    label = f"{path}" if what is None else f"{path} ({what})"
    raw = read_input_bytes(path, what or "JSON file", max_bytes, error)
    return parse_json(raw, label, expect, error=error)


# --------------------------------------------------------------------------- safetensors


def _zip_has_pickle(path: Path | IO[bytes]) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError,
            KeyError, IndexError, UnicodeDecodeError, struct.error):
        return False


def _raw_pickle(head: bytes) -> bool:
    """A raw pickle: PROTO opcode 0x80 + version 2..5.

    A safetensors file whose header length is 0x280/0x380/... also starts with 0x80 0x02..5,
    so a raw pickle is only assumed when byte 8 is not the ``{`` that opens a header.
    """
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[8:9] != b"{"


def _not_safetensors(path: Path, head: bytes, size: int) -> FormatError:
    """The most accurate "this is not a safetensors file" message for a file's first bytes."""
    stripped = head.lstrip(b" \t\r\n\xef\xbb\xbf")
    if stripped[:1] in (b"{", b"["):
        return FormatError(f"{path}: not a safetensors file (it looks like a JSON text file)")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return FormatError(f"{path}: not a safetensors file (it is a zip archive)")
    if size < 8:
        return FormatError(f"{path}: not a safetensors file (only {size} bytes)")
    return FormatError(f"{path}: not a safetensors file (no valid header)")


def _check_framing(path: Path, size: int, head: bytes, source: Path | IO[bytes] | None = None) -> int:
    """Refuse pickles and non-safetensors framing; return the header length (``source``: where a zip is read)."""
    pickled = _raw_pickle(head) or (head.startswith(b"PK\x03\x04") and _zip_has_pickle(path if source is None else source))
    if pickled or path.suffix.lower() in PICKLE_SUFFIXES:
        raise FormatError(
            f"{path}: looks like a pickled PyTorch checkpoint; lorasynth never unpickles LoRA files "
            "(they can run code). Convert it to .safetensors with a tool you trust."
        )
    if len(head) < 9:
        raise _not_safetensors(path, head, size)
    (n,) = struct.unpack("<Q", head[:8])
    # a real header length has NUL high bytes and the header opens with "{"
    if head[8:9] != b"{" or b"\0" not in head[:8] or n < 2:
        raise _not_safetensors(path, head, size)
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{path}: not a safetensors file, or a hostile one: header claims {n} bytes (limit {MAX_HEADER_BYTES})")
    if n > size - 8:
        raise FormatError(f"{path}: truncated safetensors file (header of {n} bytes, file {size} bytes)")
    return n


def _dims(path: Path, key: str, shape) -> list[int]:
    if not isinstance(shape, list):
        raise FormatError(f"{path}: tensor {key!r}: shape must be a list of integers, got {_type_name(type(shape))}")
    for d in shape:
        if type(d) is not int:
            raise FormatError(f"{path}: tensor {key!r}: shape {_short(shape)} holds a non-integer dimension {_short(d)}")
        if d < 0:
            raise FormatError(f"{path}: tensor {key!r} has a negative dimension {_short(shape)}")
    return shape


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_TENSOR_BYTES = 1 << 40  # also bounds empty tensors' other dims (strides must fit in 64 bits)


def _nbytes(dims: list[int], itemsize: int, cap: int) -> int:
    """Bytes of a tensor of ``dims``; any value above ``cap`` is returned as ``cap + 1`` (no huge products).

    The product of the non-zero dims is bounded by MAX_TENSOR_BYTES even for an empty tensor, so
    a shape like ``[0, 2**62, 2**62]`` cannot overflow a stride later.
    """
    total = itemsize
    for d in dims:
        total *= max(d, 1)
        if total > MAX_TENSOR_BYTES:
            return max(cap, MAX_TENSOR_BYTES) + 1
    if 0 in dims:
        return 0
    return total if total <= cap else cap + 1


def parse_safetensors_header(path: str | os.PathLike, raw: bytes, data_len: int) -> tuple[dict, dict[str, str]]:
    """Validate a safetensors JSON header against its data section; ``(tensor entries, metadata)``.

    Every entry must be ``{"dtype": known name, "shape": [ints >= 0], "data_offsets": [start, end]}``
    with integer offsets; sorted by offset the tensors must tile ``[0, data_len)`` exactly, and each
    must hold exactly ``prod(shape) * itemsize`` bytes. ``__metadata__`` must map strings to strings.
    """
    path = Path(path)
    header = parse_json(raw, f"{path}", dict, invalid="not a safetensors file (header is not JSON)", unique_keys=False)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: malformed safetensors metadata (expected a JSON object, got {_type_name(type(metadata))})")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise FormatError(f"{path}: malformed safetensors metadata: value of {k!r} is {_type_name(type(v))}, not a string")
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise FormatError(f"{path}: malformed safetensors entry for {key!r} (expected a JSON object)")
        missing = {"dtype", "shape", "data_offsets"} - entry.keys()
        if missing:
            raise FormatError(f"{path}: malformed safetensors entry for {key!r} (no {', '.join(sorted(missing))})")
        dtype, offsets = entry["dtype"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise FormatError(f"{path}: tensor {key!r} has an unknown dtype {_short(dtype)} (known: {', '.join(DTYPE_SIZES)})")
        dims = _dims(path, key, entry["shape"])
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise FormatError(f"{path}: tensor {key!r}: data_offsets must be two integers, got {_short(offsets)}")
        start, end = offsets
        if start < 0 or end < 0:
            raise FormatError(f"{path}: tensor {key!r} has negative data_offsets {offsets}")
        if end < start:
            raise FormatError(f"{path}: tensor {key!r} has reversed data_offsets {offsets}")
        if end > data_len:
            raise FormatError(f"{path}: truncated file: tensor {key!r} ends at byte {end}, the data section holds {data_len}")
        nbytes = _nbytes(dims, DTYPE_SIZES[dtype], data_len)
        if nbytes > MAX_TENSOR_BYTES:
            raise FormatError(f"{path}: tensor {key!r} has absurdly large dimensions {_short(dims)}; refusing a hostile file")
        if nbytes != end - start:
            raise FormatError(f"{path}: tensor {key!r} holds {end - start} bytes, which does not match its shape "
                              f"{_short(dims)} and dtype {dtype}")
        spans.append((start, end, key))
    spans.sort()
    pos, prev = 0, None
    for start, end, key in spans:
        if start < pos:
            raise FormatError(f"{path}: tensors {prev!r} and {key!r} overlap (bytes {start}..{pos}); refusing a hostile file")
        if start > pos:
            raise FormatError(f"{path}: {start - pos} unused bytes before tensor {key!r} (offsets must tile the data)")
        pos, prev = end, key
    if pos != data_len:
        raise FormatError(f"{path}: {data_len - pos} trailing bytes after the last tensor (offsets must tile the data)")
    return header, metadata


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the string metadata of a validated safetensors file.

    Raises FormatError for pickles, non-safetensors data, an oversized or invalid
    header, and truncated files. Never unpickles anything.

    The file is read once into one buffer and every tensor is a view of it (LoRA files are
    small; this is ~2x faster than safetensors' per-tensor loader for a few hundred tensors).
    Dtypes torch has no plain mapping for go through safetensors' own loader.
    """
    path = Path(path)
    with open_input(path, "file") as (f, size):
        try:
            n = _check_framing(path, size, f.read(9), f)
            f.seek(8)
            raw = f.read(n)
        except OSError as e:
            raise FormatError(f"{path}: cannot read this file: {e.strerror or e}") from None
        if len(raw) != n:
            raise FormatError(f"{path}: file changed while reading")
        header, metadata = parse_safetensors_header(path, raw, size - 8 - n)
        if any(e["dtype"] not in SAFETENSORS_DTYPES for e in header.values()):
            f.seek(0)
            whole = f.read(size + 1)
            if len(whole) != size:
                raise FormatError(f"{path}: file changed while reading")
            return _read_with_safetensors(path, whole), metadata
        data = bytearray(size - 8 - n)
        try:
            got = f.readinto(data)
        except OSError as e:
            raise FormatError(f"{path}: cannot read this file: {e.strerror or e}") from None
        if got != len(data):
            raise FormatError(f"{path}: file changed while reading")
    return tensors_from_buffer(header, data), metadata


def tensors_from_buffer(header: dict, data: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a validated header (:func:`parse_safetensors_header`), as views of ``data``."""
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
    return tensors


def safetensors_from_bytes(raw: bytes | bytearray, path: str | os.PathLike,
                           error: type[Exception] = FormatError) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of safetensors bytes already read (and hash-checked) by the caller.

    The same checks as :func:`read_safetensors` (no pickle, framing, the whole header); ``path``
    names the file in the one-line ``error``. Tensors are views of one copy of the data section.
    """
    import io

    path = Path(path)
    try:
        n = _check_framing(path, len(raw), bytes(raw[:9]), io.BytesIO(raw))
        header, metadata = parse_safetensors_header(path, bytes(raw[8 : 8 + n]), len(raw) - 8 - n)
        if any(e["dtype"] not in SAFETENSORS_DTYPES for e in header.values()):
            return _read_with_safetensors(path, bytes(raw)), metadata
    except FormatError as e:
        if error is FormatError:
            raise
        raise error(str(e)) from None
    return tensors_from_buffer(header, bytearray(memoryview(raw)[8 + n :])), metadata


def _read_with_safetensors(path: Path, raw: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_bytes

    try:
        return load_bytes(raw)
    except Exception as e:  # safetensors raises its own error types
        raise FormatError(f"{path}: cannot read safetensors data: {e}") from None


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc), else by the set-and-restore dance."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _output_error(path: Path, e: OSError) -> OutputError:
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM):
        return OutputError(f"{path}: cannot write here: permission denied (is the folder {path.parent} read-only?)")
    if e.errno == errno.EROFS:
        return OutputError(f"{path}: cannot write here: read-only file system")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{path}: cannot write: no space left on the device")
    if isinstance(e, NotADirectoryError):
        return OutputError(f"{path}: cannot write here: a part of the path is a file, not a folder")
    if isinstance(e, IsADirectoryError):
        return OutputError(f"{path}: is an existing directory; give a file path")
    return OutputError(f"{path}: cannot write: {e.strerror or e}")


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse, with one clear line, an output path that cannot become a regular file.

    An existing directory, a path below a regular file, and an existing non-regular file
    (FIFO, device) are refused; missing parent folders are fine (they get created).
    """
    path = Path(path)
    if str(path) in ("", ".") or path.name in ("", ".", ".."):
        raise OutputError(f"{path}: not a file path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        st = None  # reported below, naming the file in the way
    except OSError as e:
        raise _output_error(path, e) from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{path}: is an existing directory; give a file path")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{path}: exists and is not a regular file (a FIFO or device?); refusing to write over it")
    _check_nearest_folder(path, path.parents, "cannot write here")
    return path


def _check_nearest_folder(path: Path, candidates, what: str) -> None:
    """The nearest existing one of ``candidates`` (a path and/or its parents, nearest first) must be a
    folder: else one OutputError line naming the file in the way."""
    for folder in candidates:
        try:
            st = os.stat(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise _output_error(path, e) from None
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{path}: {what}: {folder} is a file, not a folder")
        return


def ensure_folder(path: str | os.PathLike) -> Path:
    """Create folder ``path`` (and its parents) for output; an impossible one is one OutputError line."""
    path = Path(path)
    _check_nearest_folder(path, (path, *path.parents), "cannot create this folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _output_error(path, e) from None
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temp file is removed and ``path`` is left as it was. The result
    gets the mode of the file it replaces, or ``0o666 & ~umask`` for a new file. An
    unwritable target is an :class:`OutputError` (checked before the caller's work starts).
    """
    path = check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _output_error(path, e) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            yield tmp
        except OSError as e:
            if e.filename is not None and str(e.filename) == str(tmp) or e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _output_error(path, e) from None
            raise
        try:
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except OSError:
                mode = 0o666 & ~current_umask()
            os.chmod(tmp, mode)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise _output_error(path, e) from None
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: some file systems cannot fsync a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Atomically write ``path`` by calling ``write(binary_file)`` (e.g. ``lambda f: image.save(f, "PNG")``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
    return Path(path)


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
    """Write a UTF-8 text file atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a binary file atomically."""
    return atomic_write(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2, **dumps_kwargs) -> Path:
    """Write ``value`` as a JSON file (UTF-8, trailing newline) atomically."""
    return write_text(path, json.dumps(value, indent=indent, **dumps_kwargs) + "\n")
