"""The library manifest's SQLite plumbing: connection, schema, format metadata, write lock, rows.

``library.sqlite`` runs in WAL mode with a busy timeout. Every write goes through
:func:`write_transaction` (``BEGIN IMMEDIATE``, retried with backoff while another process
holds the lock); every cursor turns a damaged database into one clear
:class:`~lorasynth.errors.LibraryError` (:func:`db_error`), also while rows are fetched. The
crash and concurrency rules these serve are in :mod:`lorasynth.library.store`.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from lorasynth.errors import LayoutError, LibraryError
from lorasynth.core.safe_io import parse_json
from lorasynth.core.layout import Layout
from lorasynth.library.records import Entry, LibraryConfig

DB_NAME = "library.sqlite"
FORMAT_NAME = "lorasynth-library"
FORMAT_VERSION = 1
DAMAGED_HINT = ("restore it from a backup, or start a new library (`lorasynth library init`) and re-import "
                "the LoRA files (`lorasynth library import`); blobs/ still holds every stored LoRA")
ENTRY_COLUMNS = "id, name, blob, layout, rank, alpha, source, created, attributes"

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


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (the manifest's ``created`` values)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- errors


def _is_busy(e: sqlite3.OperationalError) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


def db_error(root, e: sqlite3.DatabaseError) -> BaseException:
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
            raise db_error(getattr(self.connection, "root", "library"), e) from None

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


# --------------------------------------------------------------------------- connection and transactions


def connect(root: Path, config: LibraryConfig) -> sqlite3.Connection:
    """A connection to ``root``'s manifest: WAL mode, busy timeout, foreign keys, error-wrapping cursors."""
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


def init_manifest(conn: sqlite3.Connection, base_model: str, layout: Layout, embedder: str | None) -> None:
    """Create the tables and write the format metadata, in one transaction (rolled back on failure)."""
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
            "created": utc_now(),
            "generation": 0,
        }
        conn.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", meta.items())
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def read_meta(conn: sqlite3.Connection, root: Path) -> dict:
    """The checked format metadata: ``{"base_model", "layout" (a Layout), "embedder", "created"}``.

    LibraryError if this is not a lorasynth manifest, is newer than this lorasynth, or any
    value is missing or malformed.
    """
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
    try:
        layout = Layout.from_json(meta["layout"])
    except LayoutError as e:
        raise LibraryError(f"{root}: the stored layout is unreadable ({e}); {DAMAGED_HINT}") from None
    if layout.signature != meta["layout_signature"]:
        raise LibraryError(f"{root}: stored layout does not match its signature (manifest damaged?)")
    embedder = meta.get("embedder") or None
    if embedder is not None and not isinstance(embedder, str):
        raise LibraryError(f"{root}: {DB_NAME} has a malformed embedder {embedder!r}; {DAMAGED_HINT}")
    return {"base_model": meta["base_model"], "layout": layout, "embedder": embedder,
            "created": str(meta.get("created", ""))}


@contextmanager
def write_transaction(conn: sqlite3.Connection, root: Path, retries: int) -> Iterator[sqlite3.Connection]:
    """A ``BEGIN IMMEDIATE`` transaction (the write lock), retried while another writer holds it."""
    delay = 0.05
    for attempt in range(retries + 1):
        try:
            conn.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as e:
            if not _is_busy(e) or attempt == retries:
                raise LibraryError(f"{root}: library is locked by another process ({e}); try again") from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def check_embedding_dim(conn: sqlite3.Connection, embedder: str, dim: int, what: str) -> None:
    """LibraryError if the library's ``embedder`` embeddings have another dimension than ``dim``."""
    row = conn.execute("SELECT dim FROM embeddings WHERE embedder = ? LIMIT 1", (embedder,)).fetchone()
    if row is not None and row[0] != dim:
        raise LibraryError(f"{what}: [{embedder}] embedding has {dim} dims, the library's have {row[0]}")


def bump_generation(conn: sqlite3.Connection) -> None:
    """Count one more committed change (inside the caller's write transaction)."""
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")


def read_generation(conn: sqlite3.Connection) -> int:
    """The manifest's change counter (grows with every committed add, remove or embedding change)."""
    return int(conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])


# --------------------------------------------------------------------------- rows


def entry_from_row(row, root: Path) -> Entry:
    """A manifest row (:data:`ENTRY_COLUMNS`) as an Entry; a row of the wrong types (a crafted or damaged manifest) is a LibraryError."""
    try:
        attributes = parse_json(row[8], f"entry {row[0]}: attributes", dict, error=LibraryError) if isinstance(row[8], str) else None
        if attributes is None or not all(isinstance(v, str) for v in (row[1], row[2], row[3], row[6], row[7])) \
                or isinstance(row[0], bool) or not isinstance(row[0], int) or not isinstance(row[4], int) \
                or not isinstance(row[5], (int, float)):
            raise TypeError("a column holds a value of the wrong type")
        return Entry(row[0], row[1], row[2], row[3], row[4], float(row[5]), row[6], row[7], attributes=attributes)
    except (TypeError, IndexError) as e:
        raise LibraryError(f"{root}: manifest row {row[0] if row else '?'} is malformed ({e}); {DAMAGED_HINT}") from None


def read_embedding_matrix(conn: sqlite3.Connection, root: Path, embedder: str) -> tuple[int, np.ndarray, np.ndarray]:
    """``(generation, ids int64 [N], rows float32 [N, d])`` of every ``embedder`` embedding, in id order.

    Read under one snapshot so the generation matches the rows; LibraryError for mixed
    dimensions, malformed vectors or NaN/Inf values.
    """
    conn.execute("BEGIN")
    try:
        gen = read_generation(conn)
        dims = [r[0] for r in conn.execute("SELECT DISTINCT dim FROM embeddings WHERE embedder = ?", (embedder,))]
        if len(dims) > 1:
            raise LibraryError(f"[{embedder}] embeddings have mixed dimensions {dims}; run verify")
        rows = conn.execute(
            "SELECT entry_id, vector FROM embeddings WHERE embedder = ? ORDER BY entry_id", (embedder,)
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    dim = dims[0] if dims else 0
    try:
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim).copy()
    except (TypeError, ValueError, OverflowError) as e:
        raise LibraryError(f"{root}: [{embedder}] embeddings are malformed ({e}); run `lorasynth library verify`") from None
    if not np.isfinite(mat).all():
        raise LibraryError(f"{root}: [{embedder}] embeddings hold NaN/Inf; run `lorasynth library verify`")
    return gen, ids, mat


def bad_embedding_rows(conn: sqlite3.Connection) -> list[tuple[int, str, str]]:
    """``(entry id, embedder, why)`` of every embedding row of the wrong types, length or with NaN/Inf."""
    bad = []
    for entry_id, embedder, dim, vec in conn.execute("SELECT entry_id, embedder, dim, vector FROM embeddings"):
        if not isinstance(vec, bytes) or not isinstance(dim, int) or dim < 1:
            bad.append((entry_id, str(embedder), "malformed row (wrong column types)"))
        elif len(vec) != 4 * dim:
            bad.append((entry_id, embedder, f"{len(vec)} bytes for {dim} dims"))
        elif not np.isfinite(np.frombuffer(vec, dtype=np.float32)).all():
            bad.append((entry_id, embedder, "NaN/Inf values"))
    return bad
