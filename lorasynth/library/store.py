"""The LoRA library: a SQLite manifest plus content-addressed blobs, safe under concurrency.

Directory layout::

    LIB/library.sqlite                    manifest (WAL mode): meta, entries, embeddings
    LIB/blobs/<h[:2]>/<h>.safetensors     one LoRA per blob, h = sha256 of the file bytes
    LIB/blobs/tmp/                        blobs being written (stale ones are harmless)

Blobs are kohya-layout safetensors files (``lora_unet_….lora_down.weight``, ``lora_up``,
per-module ``alpha``) with fixed metadata, so they load with :func:`load_lora` anywhere
and identical LoRA tensors always give identical bytes: the blob hash doubles as the
duplicate detector. Names, sources and attributes live in the manifest, not the blob.

Crash and concurrency rules (why each step is where it is):

* A blob is written to ``blobs/tmp`` and fsynced *before* the write lock is taken, then
  renamed into place *inside* the SQLite write transaction that inserts its row. A
  process killed anywhere leaves at worst an orphan blob or a stale temp file (``verify``
  reports both, neither is an error) and never a row without its blob.
* Every write runs in ``BEGIN IMMEDIATE`` with a busy timeout plus retries, so several
  processes may add at once and nothing is lost.
* ``remove`` deletes the row first (committed), then unlinks the blob in a second
  write transaction only if no row references it any more, so a concurrent add of the
  same content can never be left pointing at a deleted file.

Duplicates: adding tensors that are already stored does not create a second entry;
:meth:`Library.add` returns the existing entry's id with ``duplicate=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import sqlite3
import struct
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from lorasynth.faces.embeddings import check_embedding
from lorasynth.errors import FormatError, LayoutError, LibraryError, LorasynthError
from lorasynth.formats import save_lora
from lorasynth.formats.common import most_common
from lorasynth.formats.keys import kohya_name
from lorasynth.core.safe_io import SAFETENSORS_DTYPES, _fsync_dir, current_umask, parse_json
from lorasynth.core.layout import Layout
from lorasynth.core.lora import LoRA, LoRAModule

DB_NAME = "library.sqlite"
BLOB_DIR = "blobs"
TMP_DIR = "tmp"
BLOB_SUFFIX = ".safetensors"
FORMAT_NAME = "lorasynth-library"
FORMAT_VERSION = 1
BLOB_METADATA = {"lorasynth.blob": "1"}  # fixed, so equal tensors give equal bytes
KNOWN_EMBEDDER_DIMS = {"dlib": 128, "arcface": 512}  # checked without loading any face model
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")  # a manifest's blob column must be exactly this (it becomes a path)
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_TEMP_NAME = re.compile(r"\.blob\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]*\.tmp")
DAMAGED_HINT = ("restore it from a backup, or start a new library (`lorasynth library init`) and re-import "
                "the LoRA files (`lorasynth library import`); blobs/ still holds every stored LoRA")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    blob TEXT NOT NULL UNIQUE,
    layout TEXT NOT NULL,
    rank INTEGER NOT NULL,
    alpha REAL NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL,
    attributes TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS embeddings (
    entry_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    embedder TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (entry_id, embedder)
);
CREATE INDEX IF NOT EXISTS embeddings_by_embedder ON embeddings (embedder, entry_id);
"""


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class LibraryConfig:
    """How a :class:`Library` talks to its disk.

    ``fsync=False`` skips the per-blob fsync (only for throwaway libraries, e.g. benchmarks):
    a power cut could then leave rows whose blob never reached the disk.
    """

    busy_timeout_s: float = 60.0  # SQLite waits this long for a lock before raising
    retries: int = 10  # extra attempts (with backoff) after a busy timeout
    fsync: bool = True
    verify_on_read: bool = True  # re-hash a blob on every get()


@dataclass
class Entry:
    """One manifest row."""

    id: int
    name: str
    blob: str
    layout: str
    rank: int
    alpha: float
    source: str
    created: str
    attributes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AddResult:
    """Outcome of an add: the entry id, and whether the LoRA was already stored.

    For a duplicate, ``id``/``name`` are those of the existing entry and nothing was written.
    """

    id: int
    name: str
    duplicate: bool = False
    repaired: bool = False  # a duplicate whose missing or corrupt blob file was rewritten from these bytes


@dataclass(frozen=True)
class NewEntry:
    """Everything :meth:`Library.add_many` needs for one LoRA."""

    lora: LoRA
    name: str
    source: str = ""
    attributes: dict = field(default_factory=dict)
    embeddings: dict = field(default_factory=dict)  # embedder name -> 1-D vector


@dataclass(frozen=True)
class Neighbor:
    """A :meth:`Library.nearest` hit: cosine similarity of the entry's embedding to the query."""

    id: int
    name: str
    score: float


@dataclass
class VerifyReport:
    """What :meth:`Library.verify` found. ``ok`` ignores orphans and temp files (harmless)."""

    checked: int = 0
    missing: list[tuple[int, str, str]] = field(default_factory=list)  # (id, name, hash)
    corrupt: list[tuple[int, str, str, str]] = field(default_factory=list)  # (id, name, hash, why)
    bad_embeddings: list[tuple[int, str, str]] = field(default_factory=list)  # (id, embedder, why)
    hostile: list[tuple[int, str, str]] = field(default_factory=list)  # (id, name, blob): not a plain blob name
    orphans: list[str] = field(default_factory=list)  # blob files no row references
    temp_files: list[str] = field(default_factory=list)  # leftovers of interrupted writes
    database: str = "ok"  # result of PRAGMA quick_check

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.bad_embeddings or self.hostile) and self.database == "ok"

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def lines(self) -> list[str]:
        out = [f"checked {self.checked} entries: {'OK' if self.ok else 'PROBLEMS FOUND'}"]
        if self.database != "ok":
            out.append(f"database integrity check: {self.database}")
        out += [f"HOSTILE blob path: entry {i} ({n}) -> {h!r} is not a plain blob name (never opened; "
                f"remove the entry, and distrust where this library came from)" for i, n, h in self.hostile]
        out += [f"missing blob: entry {i} ({n}) -> {h}" for i, n, h in self.missing]
        out += [f"corrupt blob: entry {i} ({n}) -> {h}: {why}" for i, n, h, why in self.corrupt]
        out += [f"bad embedding: entry {i} [{e}]: {why}" for i, e, why in self.bad_embeddings]
        if self.orphans:
            out.append(f"{len(self.orphans)} orphan blob(s) (unreferenced; harmless, removable with --clean)")
        if self.temp_files:
            out.append(f"{len(self.temp_files)} temp file(s) from interrupted writes (harmless, removable with --clean)")
        return out


# --------------------------------------------------------------------------- helpers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def clean_embedding(vec, what: str = "embedding") -> np.ndarray:
    """A finite, non-zero 1-D vector as float32 with unit L2 norm (cosine = dot product); see :mod:`lorasynth.faces.embeddings`."""
    return check_embedding(vec, what, error=LibraryError)


def is_blob_name(value) -> bool:
    """Whether a manifest's blob value is a plain content hash (and so a safe file name)."""
    return isinstance(value, str) and _BLOB_NAME.fullmatch(value) is not None


def _temp_owner_alive(name: str) -> bool | None:
    """For a staging temp file: whether the process that wrote it still runs (None: unknown, e.g. other host)."""
    m = _TEMP_NAME.fullmatch(name)
    if m is None or m["host"] != _HOST:
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


def _is_busy(e: sqlite3.OperationalError) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


def _db_error(root, e: sqlite3.DatabaseError) -> BaseException:
    """One clear LibraryError for a database failure; busy/locked and constraint errors pass through."""
    if isinstance(e, sqlite3.IntegrityError) or (isinstance(e, sqlite3.OperationalError) and _is_busy(e)):
        return e
    msg = str(e)
    if "readonly" in msg or "read-only" in msg:
        return LibraryError(f"{root}: the library is read-only here ({msg}); copy it somewhere writable")
    if isinstance(e, sqlite3.OperationalError) and "malformed" not in msg:
        return LibraryError(f"{root}: cannot use the library manifest {DB_NAME} ({msg})")
    return LibraryError(f"{root}: the library manifest {DB_NAME} is damaged ({msg}); {DAMAGED_HINT}")


class _Cursor(sqlite3.Cursor):
    """A cursor whose damaged-database errors are LibraryErrors (also while rows are fetched)."""

    def _wrap(self, call, *args):
        try:
            return call(*args)
        except sqlite3.DatabaseError as e:
            raise _db_error(getattr(self.connection, "root", "library"), e) from None

    def execute(self, *args):
        return self._wrap(super().execute, *args)

    def executemany(self, *args):
        return self._wrap(super().executemany, *args)

    def fetchone(self):
        return self._wrap(super().fetchone)

    def fetchall(self):
        return self._wrap(super().fetchall)

    def fetchmany(self, *args):
        return self._wrap(super().fetchmany, *args)

    def __next__(self):
        return self._wrap(super().__next__)


class _Connection(sqlite3.Connection):
    """``execute`` returns a :class:`_Cursor`, so a damaged manifest never surfaces as a raw sqlite3 error."""

    root: Path | str = "library"

    def execute(self, *args):
        return self.cursor(_Cursor).execute(*args)

    def executemany(self, *args):
        return self.cursor(_Cursor).executemany(*args)


# --------------------------------------------------------------------------- the library


class Library:
    """A directory of LoRAs sharing one base model and one :class:`Layout`.

    Open with :meth:`create` or :meth:`open`; use as a context manager or call
    :meth:`close`. One ``Library`` object per process/thread (each holds its own
    SQLite connection); any number of processes may use the same directory.
    """

    def __init__(self, root: Path, conn: sqlite3.Connection, config: LibraryConfig):
        self.root = root
        self.config = config
        self._conn = conn
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT_NAME:
            raise LibraryError(f"{root}: {DB_NAME} is not a lorasynth library manifest")
        version = meta.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise LibraryError(f"{root}: {DB_NAME} has a malformed format version {version!r}; {DAMAGED_HINT}")
        if version > FORMAT_VERSION:
            raise LibraryError(
                f"{root}: library format version {meta['version']} is newer than this lorasynth "
                f"supports ({FORMAT_VERSION}); upgrade lorasynth"
            )
        for key in ("base_model", "layout", "layout_signature"):
            if not isinstance(meta.get(key), str):
                raise LibraryError(f"{root}: {DB_NAME} lacks a valid {key!r}; {DAMAGED_HINT}")
        self.base_model: str = meta["base_model"]
        try:
            self.layout: Layout = Layout.from_json(meta["layout"])
        except LayoutError as e:
            raise LibraryError(f"{root}: the stored layout is unreadable ({e}); {DAMAGED_HINT}") from None
        if self.layout.signature != meta["layout_signature"]:
            raise LibraryError(f"{root}: stored layout does not match its signature (manifest damaged?)")
        self.embedder: str | None = meta.get("embedder") or None
        if self.embedder is not None and not isinstance(self.embedder, str):
            raise LibraryError(f"{root}: {DB_NAME} has a malformed embedder {self.embedder!r}; {DAMAGED_HINT}")
        self.created: str = str(meta.get("created", ""))
        self._emb_cache: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
        self._scores: np.ndarray | None = None  # reused output buffer of nearest()

    # ---------------------------------------------------------------- open / create
    @staticmethod
    def _connect(root: Path, config: LibraryConfig) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(root / DB_NAME), timeout=config.busy_timeout_s, isolation_level=None, check_same_thread=False,
            factory=_Connection,
        )
        conn.root = root
        conn.execute(f"PRAGMA busy_timeout = {int(config.busy_timeout_s * 1000)}")
        for _ in range(config.retries + 1):
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as e:
                if not _is_busy(e):
                    raise
                time.sleep(0.05)
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across process crashes
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        base_model: str,
        layout: Layout,
        embedder: str | None = "dlib",
        config: LibraryConfig | None = None,
    ) -> "Library":
        """Create an empty library in ``root`` (created if needed; must not hold a library)."""
        root, config = Path(root), config or LibraryConfig()
        if (root / DB_NAME).exists():
            raise LibraryError(f"{root} already holds a library; open it instead")
        if root.exists() and not root.is_dir():
            raise LibraryError(f"{root} exists and is not a directory")
        from lorasynth.core.safe_io import ensure_folder

        ensure_folder(root / BLOB_DIR / TMP_DIR)
        conn = cls._connect(root, config)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            meta = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "base_model": str(base_model),
                "layout": layout.to_json(),
                "layout_signature": layout.signature,
                "embedder": embedder or "",
                "created": _now(),
                "generation": 0,
            }
            conn.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", meta.items())
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise
        return cls(root, conn, config)

    @classmethod
    def open(cls, root: str | os.PathLike, config: LibraryConfig | None = None) -> "Library":
        """Open an existing library directory."""
        root, config = Path(root), config or LibraryConfig()
        if not (root / DB_NAME).exists():
            raise LibraryError(f"{root} is not a lorasynth library (no {DB_NAME}); create one with `lorasynth library init`")
        from lorasynth.core.safe_io import check_input_file

        check_input_file(root / DB_NAME, "library manifest", LibraryError)
        conn = None
        try:
            conn = cls._connect(root, config)
            return cls(root, conn, config)
        except (sqlite3.DatabaseError, KeyError, ValueError, LorasynthError) as e:
            if conn is not None:
                conn.close()
            if isinstance(e, LorasynthError):
                raise
            raise LibraryError(f"{root}: cannot read the library manifest {DB_NAME}: {e}") from None

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Library({str(self.root)!r}, base={self.base_model!r}, layout={self.layout.signature}, entries={len(self)})"

    # ---------------------------------------------------------------- transactions
    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction (the write lock), retried while another writer holds it."""
        delay = 0.05
        for attempt in range(self.config.retries + 1):
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or attempt == self.config.retries:
                    raise LibraryError(f"{self.root}: library is locked by another process ({e}); try again") from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _bump(self, conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")

    @property
    def generation(self) -> int:
        """Change counter: grows with every committed add, remove or embedding change."""
        return int(self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    # ---------------------------------------------------------------- paths
    def blob_path(self, digest: str) -> Path:
        """Where the blob of ``digest`` lives; a value that is not a plain hash (e.g. ``../x``) is refused."""
        if not is_blob_name(digest):
            raise LibraryError(f"{self.root}: refusing blob path {digest!r} from the manifest: not a plain blob name "
                               "(a damaged or crafted library; run `lorasynth library verify`)")
        return self.root / BLOB_DIR / digest[:2] / f"{digest}{BLOB_SUFFIX}"

    def _inside_blobs(self, path: Path) -> bool:
        """Whether ``path`` really lies in this library's blob folder (no symlinked folder leads out)."""
        try:
            return path.parent.resolve().parent == (self.root / BLOB_DIR).resolve()
        except OSError:
            return False

    # ---------------------------------------------------------------- lookups
    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    _COLUMNS = "id, name, blob, layout, rank, alpha, source, created, attributes"

    def _entry(self, row) -> Entry:
        """A manifest row as an Entry; a row of the wrong types (a crafted or damaged manifest) is a LibraryError."""
        try:
            attributes = parse_json(row[8], f"entry {row[0]}: attributes", dict, error=LibraryError) if isinstance(row[8], str) else None
            if attributes is None or not all(isinstance(v, str) for v in (row[1], row[2], row[3], row[6], row[7])) \
                    or isinstance(row[0], bool) or not isinstance(row[0], int) or not isinstance(row[4], int) \
                    or not isinstance(row[5], (int, float)):
                raise TypeError("a column holds a value of the wrong type")
            return Entry(row[0], row[1], row[2], row[3], row[4], float(row[5]), row[6], row[7], attributes=attributes)
        except (TypeError, IndexError) as e:
            raise LibraryError(f"{self.root}: manifest row {row[0] if row else '?'} is malformed ({e}); {DAMAGED_HINT}") from None

    def resolve(self, id_or_name: int | str) -> Entry:
        """The entry with this id (int or digit string) or name; LibraryError if none."""
        row = None
        if isinstance(id_or_name, (int, np.integer)) or (isinstance(id_or_name, str) and id_or_name.isdigit()):
            row = self._conn.execute(f"SELECT {self._COLUMNS} FROM entries WHERE id = ?", (int(id_or_name),)).fetchone()
        if row is None:
            row = self._conn.execute(f"SELECT {self._COLUMNS} FROM entries WHERE name = ?", (str(id_or_name),)).fetchone()
        if row is None:
            raise LibraryError(f"no entry {id_or_name!r} in {self.root}")
        return self._entry(row)

    def find_blob(self, digest: str) -> Entry | None:
        row = self._conn.execute(f"SELECT {self._COLUMNS} FROM entries WHERE blob = ?", (digest,)).fetchone()
        return None if row is None else self._entry(row)

    def list(self, limit: int | None = None, offset: int = 0) -> list[Entry]:
        """Entries in id order."""
        sql = f"SELECT {self._COLUMNS} FROM entries ORDER BY id LIMIT ? OFFSET ?"
        return [self._entry(r) for r in self._conn.execute(sql, (-1 if limit is None else limit, offset))]

    def ids(self) -> list[int]:
        return [r[0] for r in self._conn.execute("SELECT id FROM entries ORDER BY id")]

    def read_blob(self, entry: Entry) -> bytes:
        """The blob bytes of ``entry``, checked against its hash (LibraryError if missing or corrupt)."""
        path = self.blob_path(entry.blob)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LibraryError(f"entry {entry.id} ({entry.name}): blob {path} is missing; run `lorasynth library verify`") from None
        if self.config.verify_on_read and hashlib.sha256(data).hexdigest() != entry.blob:
            raise LibraryError(f"entry {entry.id} ({entry.name}): blob {path} is corrupt (hash mismatch)")
        return data

    def load(self, entry: Entry) -> LoRA:
        """The LoRA stored for ``entry`` (hash-checked when ``config.verify_on_read``)."""
        path = self.blob_path(entry.blob)
        if self.config.verify_on_read:
            data = self.read_blob(entry)
        else:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise LibraryError(f"entry {entry.id} ({entry.name}): blob {path} is missing; run `lorasynth library verify`") from None
        lora = decode_blob(data, self.layout, f"entry {entry.id} ({entry.name}): {path}")
        lora.metadata = {
            "lorasynth.name": entry.name,
            "lorasynth.library_id": str(entry.id),
            "lorasynth.source": entry.source,
            "lorasynth.base_model": self.base_model,
        }
        return lora

    def get(self, id_or_name: int | str) -> tuple[Entry, LoRA]:
        """``(entry, LoRA)`` for an id or name."""
        entry = self.resolve(id_or_name)
        return entry, self.load(entry)

    def entry_embeddings(self, entry_id: int) -> dict[str, np.ndarray]:
        rows = self._conn.execute("SELECT embedder, dim, vector FROM embeddings WHERE entry_id = ?", (entry_id,))
        try:
            return {str(e): np.frombuffer(v, dtype=np.float32, count=d).copy() for e, d, v in rows}
        except (TypeError, ValueError) as e:
            raise LibraryError(f"{self.root}: entry {entry_id}: malformed embedding ({e}); run `lorasynth library verify`") from None

    def show(self, id_or_name: int | str) -> dict:
        """A JSON-ready description of one entry: manifest row, blob file, embeddings."""
        entry = self.resolve(id_or_name)
        path = self.blob_path(entry.blob)
        embs = self.entry_embeddings(entry.id)
        return {
            **entry.to_dict(),
            "blob_path": str(path),
            "blob_bytes": path.stat().st_size if path.is_file() else None,
            "base_model": self.base_model,
            "modules": len(self.layout),
            "params": self.layout.size,
            "embeddings": {k: {"dim": int(v.size), "head": [round(float(x), 4) for x in v[:4]]} for k, v in embs.items()},
        }

    def info(self) -> dict:
        """Summary of the library: base model, layout, embedder, counts."""
        per_embedder = dict(self._conn.execute("SELECT embedder, COUNT(*) FROM embeddings GROUP BY embedder").fetchall())
        return {
            "root": str(self.root),
            "base_model": self.base_model,
            "layout_signature": self.layout.signature,
            "layout_modules": len(self.layout),
            "layout_size": self.layout.size,
            "embedder": self.embedder,
            "entries": len(self),
            "embeddings": per_embedder,
            "created": self.created,
        }

    # ---------------------------------------------------------------- validation
    def _validate(self, item: NewEntry) -> tuple[bytes, str, dict[str, np.ndarray]]:
        name = str(item.name).strip()
        if not name:
            raise LibraryError("entry name must not be empty")
        if name.isdigit():
            raise LibraryError(f"entry name {name!r} must not be all digits (it would read as an id)")
        why = self.layout.mismatch(item.lora)
        if why is not None:
            raise LayoutError(f"{name}: LoRA does not fit the library layout {self.layout.signature}: {why}")
        try:
            json.dumps(item.attributes)
        except (TypeError, ValueError) as e:
            raise LibraryError(f"{name}: attributes must be JSON-serializable: {e}") from None
        if not isinstance(item.attributes, dict):
            raise LibraryError(f"{name}: attributes must be a dict")
        embs = {str(k): clean_embedding(v, f"{name}: embedding [{k}]") for k, v in (item.embeddings or {}).items()}
        for k, v in embs.items():
            if k in KNOWN_EMBEDDER_DIMS and v.size != KNOWN_EMBEDDER_DIMS[k]:
                raise LibraryError(f"{name}: a [{k}] embedding has {KNOWN_EMBEDDER_DIMS[k]} dims, got {v.size}")
        try:
            data, finite = encode_blob(item.lora)
        except FormatError as e:
            raise LibraryError(f"{name}: {e}") from None
        if not finite or not all(math.isfinite(m.alpha) for m in item.lora.modules.values()):
            try:
                item.lora.check_finite()  # raises, naming the module
            except FormatError as e:
                raise LibraryError(f"{name}: refusing a LoRA with non-finite weights: {e}") from None
        return data, hashlib.sha256(data).hexdigest(), embs

    def _blob_intact(self, digest: str, data: bytes) -> bool:
        """Whether the blob file of ``digest`` exists and holds exactly ``data``."""
        path = self.blob_path(digest)
        try:
            if path.stat().st_size != len(data):
                return False
            return path.read_bytes() == data
        except OSError:
            return False

    def _stage(self, data: bytes) -> Path:
        """Write blob bytes to a temp file in ``blobs/tmp`` (fsynced); the caller renames it into place."""
        tmp_dir = self.root / BLOB_DIR / TMP_DIR
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".blob.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=tmp_dir)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())  # libraries are shared: not mkstemp's 0600
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.config.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def _check_dim(self, conn: sqlite3.Connection, embedder: str, dim: int, what: str) -> None:
        row = conn.execute("SELECT dim FROM embeddings WHERE embedder = ? LIMIT 1", (embedder,)).fetchone()
        if row is not None and row[0] != dim:
            raise LibraryError(f"{what}: [{embedder}] embedding has {dim} dims, the library's have {row[0]}")

    # ---------------------------------------------------------------- writes
    def add(
        self,
        lora: LoRA,
        name: str,
        source: str = "",
        attributes: dict | None = None,
        embeddings: dict[str, np.ndarray] | None = None,
    ) -> AddResult:
        """Store ``lora`` under a unique ``name``; returns its id.

        Refuses (LayoutError) a LoRA that does not fit the library layout, naming the
        mismatch; refuses NaN/Inf weights and taken names (LibraryError). Tensors already
        in the library are not stored twice: the existing entry comes back with
        ``duplicate=True`` (its name, attributes and embeddings are left unchanged).
        Embeddings (embedder name -> vector) are stored L2-normalized.
        """
        return self.add_many([NewEntry(lora, name, source, attributes or {}, embeddings or {})])[0]

    def add_many(self, items: Sequence[NewEntry]) -> list[AddResult]:
        """Add several LoRAs in one write transaction (much faster for bulk imports).

        All items are validated first (any invalid item raises before anything is
        written). Duplicates come back with ``duplicate=True``; a taken name raises
        LibraryError and rolls the whole batch back (leaving only orphan blobs).
        """
        prepared = [(item, *self._validate(item)) for item in items]
        # Stage blobs outside the lock; skip the ones already stored.
        staged: dict[str, Path] = {}
        try:
            for item, data, digest, _ in prepared:
                if digest not in staged and (self.find_blob(digest) is None or not self._blob_intact(digest, data)):
                    staged[digest] = self._stage(data)  # new, or a stored entry whose blob file is damaged
            results: list[AddResult] = []
            renamed_into: set[Path] = set()
            with self._write() as conn:
                for item, data, digest, embs in prepared:
                    existing = conn.execute("SELECT id, name FROM entries WHERE blob = ?", (digest,)).fetchone()
                    if existing is not None:
                        repaired = digest in staged and not self._blob_intact(digest, data)
                        if repaired:  # re-import repairs a missing or corrupt blob from the same bytes
                            final = self.blob_path(digest)
                            final.parent.mkdir(parents=True, exist_ok=True)
                            os.replace(staged.pop(digest), final)
                            renamed_into.add(final.parent)
                        results.append(AddResult(existing[0], existing[1], duplicate=True, repaired=repaired))
                        continue
                    name = str(item.name).strip()
                    taken = conn.execute("SELECT id FROM entries WHERE name = ?", (name,)).fetchone()
                    if taken is not None:
                        raise LibraryError(f"name {name!r} is already used by entry {taken[0]} (with different weights)")
                    final = self.blob_path(digest)
                    if digest not in staged:  # stored earlier but since removed by another process
                        staged[digest] = self._stage(next(d for it, d, h, _ in prepared if h == digest))
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged.pop(digest), final)
                    renamed_into.add(final.parent)
                    ranks = [m.rank for m in item.lora.modules.values()]
                    alphas = [m.alpha for m in item.lora.modules.values()]
                    cur = conn.execute(
                        "INSERT INTO entries (name, blob, layout, rank, alpha, source, created, attributes) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, digest, self.layout.signature, int(most_common(ranks)), float(most_common(alphas)),
                         str(item.source), _now(), json.dumps(item.attributes, sort_keys=True)),
                    )
                    entry_id = int(cur.lastrowid)
                    for embedder, vec in embs.items():
                        self._check_dim(conn, embedder, vec.size, name)
                        conn.execute(
                            "INSERT INTO embeddings (entry_id, embedder, dim, vector) VALUES (?, ?, ?, ?)",
                            (entry_id, embedder, int(vec.size), vec.tobytes()),
                        )
                    results.append(AddResult(entry_id, name, duplicate=False))
                if self.config.fsync:  # make the renames durable before the rows are
                    for folder in renamed_into:
                        _fsync_dir(folder)
                self._bump(conn)
            return results
        finally:
            for tmp in staged.values():  # duplicates found under the lock, or a failed batch
                tmp.unlink(missing_ok=True)

    def set_embedding(self, id_or_name: int | str, embedder: str, vector) -> None:
        """Set (or replace) the ``embedder`` embedding of one entry (stored L2-normalized)."""
        entry = self.resolve(id_or_name)
        vec = clean_embedding(vector, f"{entry.name}: embedding [{embedder}]")
        if embedder in KNOWN_EMBEDDER_DIMS and vec.size != KNOWN_EMBEDDER_DIMS[embedder]:
            raise LibraryError(f"{entry.name}: a [{embedder}] embedding has {KNOWN_EMBEDDER_DIMS[embedder]} dims, got {vec.size}")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM entries WHERE id = ?", (entry.id,)).fetchone() is None:
                raise LibraryError(f"entry {entry.id} was removed meanwhile")
            other = conn.execute(
                "SELECT dim FROM embeddings WHERE embedder = ? AND entry_id != ? LIMIT 1", (embedder, entry.id)
            ).fetchone()
            if other is not None and other[0] != vec.size:
                raise LibraryError(f"{entry.name}: [{embedder}] embedding has {vec.size} dims, the library's have {other[0]}")
            conn.execute(
                "INSERT OR REPLACE INTO embeddings (entry_id, embedder, dim, vector) VALUES (?, ?, ?, ?)",
                (entry.id, str(embedder), int(vec.size), vec.tobytes()),
            )
            self._bump(conn)

    def remove(self, id_or_name: int | str) -> Entry:
        """Delete an entry (and its embeddings); its blob goes too unless another entry shares it."""
        entry = self.resolve(id_or_name)
        with self._write() as conn:
            cur = conn.execute("DELETE FROM entries WHERE id = ?", (entry.id,))
            if cur.rowcount == 0:
                raise LibraryError(f"entry {entry.id} was removed meanwhile")
            self._bump(conn)
        # Second transaction: unlink only if still unreferenced, under the write lock, so a
        # concurrent add of the same tensors (which renames its blob in under the lock) is safe.
        if not is_blob_name(entry.blob):  # a crafted row: drop it, touch no file
            return entry
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM entries WHERE blob = ?", (entry.blob,)).fetchone() is None:
                path = self.blob_path(entry.blob)
                if self._inside_blobs(path):
                    path.unlink(missing_ok=True)
        return entry

    def export(self, id_or_name: int | str, path: str | os.PathLike, fmt: str = "kohya") -> Path:
        """Write one entry as a standalone LoRA file (``kohya`` or ``diffusers``), atomically."""
        entry, lora = self.get(id_or_name)
        if entry.attributes:
            lora.metadata["lorasynth.attributes"] = json.dumps(entry.attributes, sort_keys=True)
        return save_lora(lora, path, fmt)

    # ---------------------------------------------------------------- embeddings / search
    def entry_embedders(self) -> dict[int, list[str]]:
        """Entry id -> names of the embedders it has an embedding for."""
        out: dict[int, list[str]] = {}
        for eid, emb in self._conn.execute("SELECT entry_id, embedder FROM embeddings ORDER BY entry_id, embedder"):
            out.setdefault(eid, []).append(emb)
        return out

    def embedders(self) -> dict[str, int]:
        """Embedder name -> number of entries that have its embedding."""
        return dict(self._conn.execute("SELECT embedder, COUNT(*) FROM embeddings GROUP BY embedder").fetchall())

    def embeddings(self, embedder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64 [N], matrix float32 [N, d])`` of every entry with an ``embedder`` embedding.

        Rows are unit-norm and in id order. Cached in memory until the library changes
        (any process), so repeated calls cost one tiny query; the arrays are read-only.
        """
        embedder = embedder or self.embedder
        if not embedder:
            raise LibraryError("this library has no default embedder; name one")
        gen = self.generation
        hit = self._emb_cache.get(embedder)
        if hit is not None and hit[0] == gen:
            return hit[1], hit[2]
        # Read under one snapshot so the generation matches the rows.
        self._conn.execute("BEGIN")
        try:
            gen = self.generation
            dims = [r[0] for r in self._conn.execute("SELECT DISTINCT dim FROM embeddings WHERE embedder = ?", (embedder,))]
            if len(dims) > 1:
                raise LibraryError(f"[{embedder}] embeddings have mixed dimensions {dims}; run verify")
            rows = self._conn.execute(
                "SELECT entry_id, vector FROM embeddings WHERE embedder = ? ORDER BY entry_id", (embedder,)
            ).fetchall()
        finally:
            self._conn.execute("COMMIT")
        dim = dims[0] if dims else 0
        try:
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim).copy()
        except (TypeError, ValueError, OverflowError) as e:
            raise LibraryError(f"{self.root}: [{embedder}] embeddings are malformed ({e}); run `lorasynth library verify`") from None
        if not np.isfinite(mat).all():
            raise LibraryError(f"{self.root}: [{embedder}] embeddings hold NaN/Inf; run `lorasynth library verify`")
        ids.setflags(write=False)  # shared with the cache: read-only
        mat.setflags(write=False)
        self._emb_cache[embedder] = (gen, ids, mat)
        return ids, mat

    def nearest(self, embedding, embedder: str | None = None, k: int = 5) -> list[Neighbor]:
        """The ``k`` entries whose ``embedder`` embedding is most cosine-similar to ``embedding``."""
        ids, mat = self.embeddings(embedder)
        if len(ids) == 0:
            return []
        q = clean_embedding(embedding, "query embedding")
        if q.size != mat.shape[1]:
            raise LibraryError(f"query embedding has {q.size} dims, the library's [{embedder or self.embedder}] have {mat.shape[1]}")
        scores = np.dot(mat, q, out=self._scores_buffer(len(ids)))
        k = max(0, min(int(k), len(ids)))
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k] if k < len(ids) else np.arange(len(ids))
        top = top[np.argsort(-scores[top], kind="stable")]
        chosen = [int(ids[i]) for i in top]
        names = dict(self._conn.execute(
            f"SELECT id, name FROM entries WHERE id IN ({','.join('?' * len(chosen))})", chosen
        ).fetchall())
        return [Neighbor(i, names.get(i, "?"), float(scores[j])) for i, j in zip(chosen, top)]

    def _scores_buffer(self, n: int) -> np.ndarray:
        if self._scores is None or len(self._scores) != n:
            self._scores = np.empty(n, dtype=np.float32)
        return self._scores

    # ---------------------------------------------------------------- integrity
    def _blob_files(self) -> tuple[dict[str, Path], list[Path]]:
        """Blob files on disk by hash, and temp/unexpected files."""
        blobs, temps = {}, []
        base = self.root / BLOB_DIR
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

    def verify(self, progress: Callable[[Iterable], Iterable] | None = None) -> VerifyReport:
        """Re-hash every blob; report missing/corrupt blobs, bad embeddings, orphans, temp files."""
        report = VerifyReport()
        report.database = str(self._conn.execute("PRAGMA quick_check").fetchone()[0])
        rows = self._conn.execute("SELECT id, name, blob FROM entries ORDER BY id").fetchall()
        referenced = set()
        for entry_id, name, digest in progress(rows) if progress else rows:
            report.checked += 1
            if not is_blob_name(digest):
                report.hostile.append((entry_id, str(name), str(digest)[:200]))
                continue
            referenced.add(digest)
            path = self.blob_path(digest)
            h = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            except (FileNotFoundError, NotADirectoryError):
                report.missing.append((entry_id, name, digest))
                continue
            except OSError as e:  # a directory, a FIFO, no permission...
                report.corrupt.append((entry_id, name, digest, f"unreadable: {e.strerror or e}"))
                continue
            if h.hexdigest() != digest:
                report.corrupt.append((entry_id, name, digest, "hash mismatch"))
        for entry_id, embedder, dim, vec in self._conn.execute("SELECT entry_id, embedder, dim, vector FROM embeddings"):
            if not isinstance(vec, bytes) or not isinstance(dim, int) or dim < 1:
                report.bad_embeddings.append((entry_id, str(embedder), "malformed row (wrong column types)"))
            elif len(vec) != 4 * dim:
                report.bad_embeddings.append((entry_id, embedder, f"{len(vec)} bytes for {dim} dims"))
            elif not np.isfinite(np.frombuffer(vec, dtype=np.float32)).all():
                report.bad_embeddings.append((entry_id, embedder, "NaN/Inf values"))
        blobs, temps = self._blob_files()
        # Re-read references: rows committed by other processes during the scan are not orphans.
        referenced |= {r[0] for r in self._conn.execute("SELECT blob FROM entries") if is_blob_name(r[0])}
        report.orphans = sorted(str(p) for h, p in blobs.items() if h not in referenced)
        report.temp_files = sorted(str(p) for p in temps)
        return report

    def clean(self, temp_age_s: float = 3600.0) -> tuple[int, int]:
        """Delete orphan blobs and the temp files no live process owns; returns their counts.

        A staging temp file carries its writer's host and pid: it is removed once that process is
        gone. Other temp files (unknown writer, another host) are removed when older than
        ``temp_age_s``. Runs under the write lock, so no concurrent add is between renaming its
        blob in and committing its row.
        """
        removed_orphans = removed_temps = 0
        with self._write() as conn:
            referenced = {r[0] for r in conn.execute("SELECT blob FROM entries")}
            blobs, temps = self._blob_files()
            for h, p in blobs.items():
                if h not in referenced and self._inside_blobs(p):
                    p.unlink(missing_ok=True)
                    removed_orphans += 1
            now = time.time()
            for p in temps:
                try:
                    if not p.is_file():
                        continue
                    alive = _temp_owner_alive(p.name)
                    if alive is False or (alive is None and now - p.stat().st_mtime >= temp_age_s):
                        p.unlink()
                        removed_temps += 1
                except FileNotFoundError:
                    pass
        return removed_orphans, removed_temps
