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

The code is split by job: :mod:`lorasynth.library.blobs` (blob bytes, names, staging files),
:mod:`lorasynth.library.db` (the SQLite manifest: connection, schema, write lock, rows),
:mod:`lorasynth.library.records` (value types and new-entry checks) and this module (the
:class:`Library` that ties them together). Their public names stay importable from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from lorasynth.errors import LibraryError, LorasynthError
from lorasynth.formats import save_lora
from lorasynth.formats.common import most_common
from lorasynth.core.numbers import is_id_text, parse_id
from lorasynth.core.safe_io import fsync_dir, input_sha256, read_input_bytes
from lorasynth.core.layout import Layout
from lorasynth.core.lora import LoRA
from lorasynth.library.blobs import (
    BLOB_DIR,
    BLOB_METADATA,
    BLOB_SUFFIX,
    HOST,
    TMP_DIR,
    blob_bytes,
    MAX_BLOB_BYTES,
    blob_intact,
    decode_blob,
    encode_blob,
    is_blob_name,
    list_blob_files,
    stage_blob,
    temp_owner_alive,
)
from lorasynth.library.db import (
    DAMAGED_HINT,
    DB_NAME,
    ENTRY_COLUMNS,
    FORMAT_NAME,
    FORMAT_VERSION,
    bad_embedding_rows,
    bump_generation,
    check_embedding_dim,
    connect,
    entry_from_row,
    init_manifest,
    read_embedding_matrix,
    read_generation,
    read_meta,
    utc_now,
    write_transaction,
)
from lorasynth.library.records import (
    KNOWN_EMBEDDER_DIMS,
    AddResult,
    Entry,
    LibraryConfig,
    Neighbor,
    NewEntry,
    VerifyReport,
    clean_embedding,
    prepare_entry,
)


__all__ = [
    "AddResult",
    "BLOB_DIR",
    "BLOB_METADATA",
    "BLOB_SUFFIX",
    "DAMAGED_HINT",
    "DB_NAME",
    "Entry",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KNOWN_EMBEDDER_DIMS",
    "Library",
    "LibraryConfig",
    "Neighbor",
    "NewEntry",
    "TMP_DIR",
    "VerifyReport",
    "blob_bytes",
    "clean_embedding",
    "decode_blob",
    "encode_blob",
    "is_blob_name",
]


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
        meta = read_meta(conn, root)
        self.base_model: str = meta["base_model"]
        self.layout: Layout = meta["layout"]
        self.embedder: str | None = meta["embedder"]
        self.created: str = meta["created"]
        self._emb_cache: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
        self._scores: np.ndarray | None = None  # reused output buffer of nearest()

    # ---------------------------------------------------------------- open / create
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
        conn = connect(root, config)
        try:
            init_manifest(conn, base_model, layout, embedder)
        except BaseException:
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
            conn = connect(root, config)
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
    def _write(self):
        """A ``BEGIN IMMEDIATE`` transaction (the write lock), retried while another writer holds it."""
        return write_transaction(self._conn, self.root, self.config.retries)

    @property
    def generation(self) -> int:
        """Change counter: grows with every committed add, remove or embedding change."""
        return read_generation(self._conn)

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

    def _entry(self, row) -> Entry:
        return entry_from_row(row, self.root)

    def resolve(self, id_or_name: int | str) -> Entry:
        """The entry with this id (int or ASCII-digit string) or name; LibraryError if none.

        Ids go through :func:`lorasynth.core.numbers.parse_id` (0..2**63-1; ``"²"`` is a name, not an
        id; a bool, a float or a too-large number is one InputError line).
        """
        row = None
        if not isinstance(id_or_name, str) or is_id_text(id_or_name):
            entry_id = parse_id(id_or_name)
            row = self._conn.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE id = ?", (entry_id,)).fetchone()
        if row is None:
            row = self._conn.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE name = ?", (str(id_or_name),)).fetchone()
        if row is None:
            raise LibraryError(f"no entry {id_or_name!r} in {self.root}")
        return self._entry(row)

    def find_blob(self, digest: str) -> Entry | None:
        row = self._conn.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE blob = ?", (digest,)).fetchone()
        return None if row is None else self._entry(row)

    def list(self, limit: int | None = None, offset: int = 0) -> list[Entry]:
        """Entries in id order."""
        sql = f"SELECT {ENTRY_COLUMNS} FROM entries ORDER BY id LIMIT ? OFFSET ?"
        return [self._entry(r) for r in self._conn.execute(sql, (-1 if limit is None else limit, offset))]

    def ids(self) -> list[int]:
        return [r[0] for r in self._conn.execute("SELECT id FROM entries ORDER BY id")]

    def read_blob(self, entry: Entry, verify: bool | None = None) -> bytes:
        """The blob bytes of ``entry``, checked against its hash (LibraryError if missing or corrupt).

        One read of a regular file (a FIFO, a device or a link in the blob folder is refused, never
        opened for reading or followed), bounded by :data:`MAX_BLOB_BYTES`; the hash is computed on
        the bytes returned, so what is decoded is what was checked. ``verify``: default
        ``config.verify_on_read``.
        """
        path = self.blob_path(entry.blob)
        what = f"entry {entry.id} ({entry.name}): blob"
        if not os.path.lexists(path):
            raise LibraryError(f"{what} {path} is missing; run `lorasynth library verify`")
        try:
            data = read_input_bytes(path, "blob file", MAX_BLOB_BYTES, LibraryError, follow_links=False)
        except LibraryError as e:
            raise LibraryError(f"{what}: {e}; run `lorasynth library verify`") from None
        if (self.config.verify_on_read if verify is None else verify) and hashlib.sha256(data).hexdigest() != entry.blob:
            raise LibraryError(f"{what} {path} is corrupt (hash mismatch)")
        return data

    def load(self, entry: Entry) -> LoRA:
        """The LoRA stored for ``entry`` (hash-checked when ``config.verify_on_read``)."""
        path = self.blob_path(entry.blob)
        data = self.read_blob(entry)
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

    # ---------------------------------------------------------------- write steps
    def _stage(self, data: bytes) -> Path:
        """Write blob bytes to a temp file in ``blobs/tmp`` (fsynced); the caller renames it into place."""
        return stage_blob(self.root / BLOB_DIR / TMP_DIR, data, self.config.fsync)

    def _rename_in(self, staged: Path, digest: str) -> Path:
        """Move a staged blob to its final path (inside the write transaction); returns the folder it went to."""
        final = self.blob_path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)
        return final.parent

    def _insert(self, conn: sqlite3.Connection, item: NewEntry, name: str, digest: str,
                embs: dict[str, np.ndarray]) -> AddResult:
        """Insert the manifest row of a new entry and its embeddings (its blob is already in place)."""
        ranks = [m.rank for m in item.lora.modules.values()]
        alphas = [m.alpha for m in item.lora.modules.values()]
        cur = conn.execute(
            "INSERT INTO entries (name, blob, layout, rank, alpha, source, created, attributes) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (name, digest, self.layout.signature, int(most_common(ranks)), float(most_common(alphas)),
             str(item.source), utc_now(), json.dumps(item.attributes, sort_keys=True)),
        )
        entry_id = int(cur.lastrowid)
        for embedder, vec in embs.items():
            check_embedding_dim(conn, embedder, vec.size, name)
            conn.execute(
                "INSERT INTO embeddings (entry_id, embedder, dim, vector) VALUES (?, ?, ?, ?)",
                (entry_id, embedder, int(vec.size), vec.tobytes()),
            )
        return AddResult(entry_id, name, duplicate=False)

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
        prepared = [(item, *prepare_entry(item, self.layout)) for item in items]
        # Stage blobs outside the lock; skip the ones already stored.
        staged: dict[str, Path] = {}
        try:
            for item, data, digest, _ in prepared:
                if digest not in staged and (self.find_blob(digest) is None or not blob_intact(self.blob_path(digest), data)):
                    staged[digest] = self._stage(data)  # new, or a stored entry whose blob file is damaged
            results: list[AddResult] = []
            renamed_into: set[Path] = set()
            with self._write() as conn:
                for item, data, digest, embs in prepared:
                    existing = conn.execute("SELECT id, name FROM entries WHERE blob = ?", (digest,)).fetchone()
                    if existing is not None:
                        repaired = digest in staged and not blob_intact(self.blob_path(digest), data)
                        if repaired:  # re-import repairs a missing or corrupt blob from the same bytes
                            renamed_into.add(self._rename_in(staged.pop(digest), digest))
                        results.append(AddResult(existing[0], existing[1], duplicate=True, repaired=repaired))
                        continue
                    name = str(item.name).strip()
                    taken = conn.execute("SELECT id FROM entries WHERE name = ?", (name,)).fetchone()
                    if taken is not None:
                        raise LibraryError(f"name {name!r} is already used by entry {taken[0]} (with different weights)")
                    if digest not in staged:  # stored earlier but since removed by another process
                        staged[digest] = self._stage(next(d for it, d, h, _ in prepared if h == digest))
                    renamed_into.add(self._rename_in(staged.pop(digest), digest))
                    results.append(self._insert(conn, item, name, digest, embs))
                if self.config.fsync:  # make the renames durable before the rows are
                    for folder in renamed_into:
                        fsync_dir(folder)
                bump_generation(conn)
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
            bump_generation(conn)

    def remove(self, id_or_name: int | str) -> Entry:
        """Delete an entry (and its embeddings); its blob goes too unless another entry shares it."""
        entry = self.resolve(id_or_name)
        with self._write() as conn:
            cur = conn.execute("DELETE FROM entries WHERE id = ?", (entry.id,))
            if cur.rowcount == 0:
                raise LibraryError(f"entry {entry.id} was removed meanwhile")
            bump_generation(conn)
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
        gen, ids, mat = read_embedding_matrix(self._conn, self.root, embedder)
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
            if not os.path.lexists(path):
                report.missing.append((entry_id, name, digest))
                continue
            try:  # a regular file, not followed through a link, read up to its size
                got = input_sha256(path, "blob file", LibraryError, follow_links=False)
            except LibraryError as e:  # a directory, a FIFO, a device, a link, no permission...
                report.corrupt.append((entry_id, name, digest, f"unreadable: {str(e).removeprefix(f'{path}: ')}"))
                continue
            if got != digest:
                report.corrupt.append((entry_id, name, digest, "hash mismatch"))
        report.bad_embeddings = bad_embedding_rows(self._conn)
        blobs, temps = list_blob_files(self.root)
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
            blobs, temps = list_blob_files(self.root)
            for h, p in blobs.items():
                if h not in referenced and self._inside_blobs(p):
                    p.unlink(missing_ok=True)
                    removed_orphans += 1
            now = time.time()
            for p in temps:
                try:
                    if not p.is_file():
                        continue
                    alive = temp_owner_alive(p.name)
                    if alive is False or (alive is None and now - p.stat().st_mtime >= temp_age_s):
                        p.unlink()
                        removed_temps += 1
                except FileNotFoundError:
                    pass
        return removed_orphans, removed_temps
