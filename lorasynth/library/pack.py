"""The packed training matrix: every library LoRA as one row of a memory-mappable file.

A pack is a directory:

* ``vectors.npy``      float32 ``N x D``: canonical flattened LoRAs (:meth:`Layout.flatten`),
  a plain ``.npy`` (header from ``numpy.lib.format``) readable with
  ``numpy.load(..., mmap_mode="r")`` by any tool;
* ``embeddings.npy``   float32 ``N x E`` face embeddings (``E`` may be 0);
* ``stats.safetensors`` per-column ``mean`` and ``std`` (float32 ``D``, population std);
* ``pack.json``        layout, layout signature, ``N``, ``D``, ``E``, embedder name, entry
  ids, ``canonical: true``, format version.

Why this shape: training and PCA stream row batches from disk, so a 20,000 x 99,648 pack
(8 GB, the w2w layout) never has to fit in RAM. Rows are written and read with
``pwrite``/``pread`` on the file (not through a mapping), so the process RSS stays bounded
by one batch even though the page cache holds the file. ``Pack.vectors`` is still a
read-only ``numpy.memmap`` for ad-hoc use.

:class:`PackWriter` builds the pack in a hidden temporary sibling directory and renames it
into place on a clean close, so a crash or an exception never leaves a half-written pack
under the final name. Column statistics are accumulated in float64 with Chan et al.'s
parallel update (Welford for batches), in one pass.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from torch.utils.data import Dataset

from lorasynth.errors import LayoutError, LibraryError, OutputError
from lorasynth.core.safe_io import (MAX_JSON_BYTES, ensure_folder, kind_problem, open_input, read_input_bytes, read_json,
                                    safetensors_from_bytes)
from lorasynth.core.layout import Layout

PACK_VERSION = 1
VECTORS_FILE = "vectors.npy"
EMBEDDINGS_FILE = "embeddings.npy"
STATS_FILE = "stats.safetensors"
META_FILE = "pack.json"
#: every file a pack consists of (what `export-model --include-pack` copies; nothing else in the folder)
PACK_FILES = (META_FILE, VECTORS_FILE, EMBEDDINGS_FILE, STATS_FILE)
MAX_STATS_BYTES = MAX_JSON_BYTES * 16  # two float32 columns of the layout: 800 KB for w2w

#: Floor of the standardisation scale, relative to the median column std. Columns that
#: never vary (std 0) would divide by zero; near-constant ones would turn rounding noise
#: into unit-variance targets and dominate an MSE loss.
STD_FLOOR_REL = 1e-3
STD_FLOOR_ABS = 1e-12


def std_floor(std: np.ndarray) -> np.ndarray:
    """The standardisation scale used everywhere: ``max(std, 1e-3 * median(std), 1e-12)``."""
    std = np.asarray(std, dtype=np.float32)
    floor = max(STD_FLOOR_ABS, STD_FLOOR_REL * float(np.median(std))) if std.size else STD_FLOOR_ABS
    return np.maximum(std, np.float32(floor)).astype(np.float32)


# --------------------------------------------------------------------------- raw row I/O


class _RowFile:
    """pread/pwrite access to the rows of a C-ordered float32 2-D ``.npy`` file.

    The file descriptor is opened lazily and per process, so the object survives being
    sent to DataLoader workers (fork or spawn).
    """

    def __init__(self, path: Path, n_rows: int, n_cols: int, offset: int, writable: bool = False):
        self.path, self.n_rows, self.n_cols, self.offset = Path(path), n_rows, n_cols, offset
        self.writable = writable
        self._fd: int | None = None
        self._pid: int | None = None

    @classmethod
    def open(cls, path: Path, writable: bool = False) -> "_RowFile":
        with open_input(path, "pack file", LibraryError) as (f, size):  # a regular file, checked on the open file
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if len(shape) != 2 or fortran or dtype != np.float32:
            raise LibraryError(f"{path}: expected a C-ordered float32 2-D array, got shape {shape} {dtype}")
        expected = offset + shape[0] * shape[1] * 4
        if size < expected:
            raise LibraryError(f"{path} is truncated: {size} bytes, expected {expected}")
        return cls(path, int(shape[0]), int(shape[1]), offset, writable)

    def _fileno(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            flags = (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            try:
                fd = os.open(self.path, flags)
            except OSError as e:
                raise LibraryError(f"{self.path}: cannot open this pack file: {e.strerror or e}") from None
            why = kind_problem(os.fstat(fd).st_mode, "pack file")
            if why is not None:  # replaced since the pack was opened
                os.close(fd)
                raise LibraryError(f"{self.path}: {why}")
            self._fd, self._pid = fd, os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=np.float32)
        if data.size:
            buf = memoryview(data).cast("B")
            pos, done = self.offset + start * self.n_cols * 4, 0
            while done < len(buf):
                done += os.pwrite(self._fileno(), buf[done:], pos + done)

    def read_rows(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows ``idx`` (any order, repeats allowed) as a new ``(len(idx), n_cols)`` array.

        Consecutive indices are read with one ``pread`` each run.
        """
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.n_cols), dtype=np.float32)
        if len(idx) == 0 or self.n_cols == 0:
            return out
        if idx.min() < 0 or idx.max() >= self.n_rows:
            raise IndexError(f"row index out of range 0..{self.n_rows - 1}")
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
        row_bytes = self.n_cols * 4
        tmp = out if np.all(order == np.arange(len(idx))) else np.empty_like(out)
        for run_start, run_end in zip(np.r_[0, breaks], np.r_[breaks, len(idx)]):
            first = int(sorted_idx[run_start])
            view = memoryview(tmp[run_start:run_end]).cast("B")
            pos, done = self.offset + first * row_bytes, 0
            while done < len(view):
                got = os.preadv(self._fileno(), [view[done:]], pos + done)
                if got <= 0:
                    raise LibraryError(f"{self.path}: unexpected end of file")
                done += got
        if tmp is not out:
            out[order] = tmp
        return out


def _create_npy(path: Path, n_rows: int, n_cols: int) -> _RowFile:
    """Create a zero-filled (sparse) float32 ``.npy`` of the final size; return its row file."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_rows, n_cols)) if n_rows * n_cols else None
    if mm is None:  # numpy cannot map an empty array: write it plainly
        np.save(path, np.zeros((n_rows, n_cols), dtype=np.float32))
    else:
        del mm
    return _RowFile.open(path, writable=True)


# --------------------------------------------------------------------------- statistics


class RunningStats:
    """Per-column mean / population variance, one pass, float64 (Chan et al. merge)."""

    def __init__(self, dim: int):
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros(dim, dtype=np.float64)

    def update(self, rows: np.ndarray, block: int = 8192) -> None:
        """Merge a batch of rows; columns go in blocks so the float64 temporaries stay small."""
        n_b = rows.shape[0]
        if n_b == 0:
            return
        n = self.count + n_b
        for c in range(0, rows.shape[1], block):
            part = np.asarray(rows[:, c : c + block], dtype=np.float64)
            mean_b = part.mean(axis=0)
            m2_b = ((part - mean_b) ** 2).sum(axis=0)
            delta = mean_b - self.mean[c : c + block]
            self.mean[c : c + block] += delta * (n_b / n)
            self.m2[c : c + block] += m2_b + delta**2 * (self.count * n_b / n)
        self.count = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))


# --------------------------------------------------------------------------- writer


class PackWriter:
    """Stream rows into a new pack; the pack appears at ``out_dir`` only on a clean close.

    Use as a context manager::

        with PackWriter(out, layout, n=len(entries), embed_dim=512, embedder="arcface") as w:
            for entry in entries:
                w.add(layout.flatten(entry.lora), entry.embedding, entry.id)

    ``n`` is the number of rows planned; fewer rows may be added (e.g. entries skipped),
    the pack is then trimmed on close. ``overwrite=True`` replaces an existing pack at
    ``out_dir`` atomically enough (the old one is moved aside, then deleted).
    """

    def __init__(self, out_dir: str | Path, layout: Layout, n: int, embed_dim: int = 0,
                 embedder: str = "", overwrite: bool = False, meta: dict | None = None):
        self.out_dir = Path(out_dir).expanduser().resolve()
        if self.out_dir.exists() and not overwrite:
            raise LibraryError(f"{self.out_dir} already exists (pass overwrite=True to replace it)")
        if n < 0 or embed_dim < 0:
            raise ValueError("n and embed_dim must be >= 0")
        self.layout, self.n, self.embed_dim, self.embedder = layout, int(n), int(embed_dim), embedder
        self.overwrite, self.meta = overwrite, dict(meta or {})
        self.dim = layout.size
        self.count = 0
        self.ids: list[str] = []
        self._seen: set[str] = set()
        self._stats = RunningStats(self.dim)
        self._tmp: Path | None = None
        self._vectors: _RowFile | None = None
        self._embeddings: _RowFile | None = None

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> "PackWriter":
        ensure_folder(self.out_dir.parent)
        try:
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.writing-", dir=self.out_dir.parent))
        except OSError as e:
            raise OutputError(f"{self.out_dir}: cannot write here: {e.strerror or e}") from None
        self._vectors = _create_npy(self._tmp / VECTORS_FILE, self.n, self.dim)
        self._embeddings = _create_npy(self._tmp / EMBEDDINGS_FILE, self.n, self.embed_dim)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            for f in (self._vectors, self._embeddings):
                if f is not None:
                    f.close()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    # -------------------------------------------------------------- adding rows
    def add(self, vector, embedding=None, entry_id: str | None = None) -> None:
        """Append one row: a ``(D,)`` vector, an ``(E,)`` embedding (None when E = 0), an id."""
        vector = _as_numpy(vector).reshape(1, -1)
        emb = None if embedding is None else _as_numpy(embedding).reshape(1, -1)
        self.add_batch(vector, emb, None if entry_id is None else [entry_id])

    def add_batch(self, vectors, embeddings=None, ids: Sequence[str] | None = None) -> None:
        """Append rows: ``(b, D)`` vectors, ``(b, E)`` embeddings, ``b`` ids (default ``row<k>``)."""
        if self._tmp is None:
            raise LibraryError("PackWriter must be used as a context manager (with PackWriter(...) as w:)")
        vectors = _as_numpy(vectors)
        b = vectors.shape[0]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise LayoutError(f"vectors of shape {tuple(vectors.shape)} do not match layout size {self.dim}")
        if not np.isfinite(vectors).all():
            raise LibraryError("vectors contain NaN/Inf; refusing to pack them")
        if self.embed_dim:
            if embeddings is None:
                raise LibraryError(f"this pack needs {self.embed_dim}-d embeddings for every row")
            embeddings = _as_numpy(embeddings)
            if embeddings.shape != (b, self.embed_dim):
                raise LibraryError(f"embeddings of shape {tuple(embeddings.shape)}, expected {(b, self.embed_dim)}")
            if not np.isfinite(embeddings).all():
                raise LibraryError("embeddings contain NaN/Inf")
        elif embeddings is not None and _as_numpy(embeddings).size:
            raise LibraryError("this pack was opened with embed_dim=0 but embeddings were given")
        ids = [f"row{self.count + j}" for j in range(b)] if ids is None else [str(i) for i in ids]
        if len(ids) != b:
            raise LibraryError(f"{len(ids)} ids for {b} rows")
        for entry_id in ids:
            if entry_id in self._seen:
                raise LibraryError(f"duplicate entry id {entry_id!r}")
            self._seen.add(entry_id)
        if self.count + b > self.n:
            raise LibraryError(f"pack planned for {self.n} rows; got more")
        self._vectors.write_rows(self.count, vectors)
        if self.embed_dim:
            self._embeddings.write_rows(self.count, embeddings)
        self._stats.update(vectors)
        self.ids.extend(ids)
        self.count += b

    # -------------------------------------------------------------- closing
    def _finish(self) -> None:
        assert self._tmp is not None
        if self.count == 0:
            raise LibraryError("refusing to write an empty pack (no rows were added)")
        if self.count < self.n:
            for name, cols, handle in ((VECTORS_FILE, self.dim, self._vectors), (EMBEDDINGS_FILE, self.embed_dim, self._embeddings)):
                handle.close()
                _trim_npy(self._tmp / name, self.count, cols, handle)
        for f in (self._vectors, self._embeddings):
            f.close()
        save_file(
            {"mean": self._stats.mean.astype(np.float32), "std": self._stats.std.astype(np.float32)},
            str(self._tmp / STATS_FILE),
        )
        meta = {
            "format": "lorasynth-pack",
            "version": PACK_VERSION,
            "layout": self.layout.to_dict(),
            "layout_signature": self.layout.signature,
            "n": self.count,
            "dim": self.dim,
            "embed_dim": self.embed_dim,
            "embedder": self.embedder,
            "canonical": True,
            "ids": self.ids,
            **({"meta": self.meta} if self.meta else {}),
        }
        (self._tmp / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
        for name in (VECTORS_FILE, EMBEDDINGS_FILE, STATS_FILE, META_FILE):
            _fsync(self._tmp / name)
        _move_into_place(self._tmp, self.out_dir)
        self._tmp = None


def _trim_npy(path: Path, n_rows: int, n_cols: int, old: _RowFile) -> None:
    """Rewrite a ``.npy`` keeping its first ``n_rows`` rows, copying in bounded chunks."""
    trimmed = path.with_suffix(".trim.npy")
    new = _create_npy(trimmed, n_rows, n_cols)
    step = max(1, (64 << 20) // max(1, n_cols * 4))
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        new.write_rows(start, old.read_rows(np.arange(start, stop)))
    new.close()
    old.close()
    os.replace(trimmed, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- reader


@dataclass
class Pack:
    """An opened pack. ``vectors``/``embeddings`` are read-only memmaps; prefer
    :meth:`read_rows` / :meth:`read_embeddings` (bounded RSS) for bulk access."""

    path: Path
    layout: Layout
    ids: list[str]
    embedder: str
    mean: np.ndarray  # (D,) float32
    std: np.ndarray  # (D,) float32, population std
    meta: dict = field(repr=False)
    _vec_file: _RowFile = field(repr=False)
    _emb_file: _RowFile = field(repr=False)

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.layout.size

    @property
    def embed_dim(self) -> int:
        return self._emb_file.n_cols

    def __len__(self) -> int:
        return self.n

    @property
    def scale(self) -> np.ndarray:
        """The std with a floor (:func:`std_floor`): divide by this to standardise."""
        return std_floor(self.std)

    @property
    def vectors(self) -> np.memmap:
        return np.load(self.path / VECTORS_FILE, mmap_mode="r")

    @property
    def embeddings(self) -> np.ndarray:
        if self.embed_dim == 0:
            return np.zeros((self.n, 0), dtype=np.float32)
        return np.load(self.path / EMBEDDINGS_FILE, mmap_mode="r")

    def read_rows(self, idx) -> np.ndarray:
        """Raw vectors of rows ``idx`` as a new float32 array (pread; no mapping kept); NaN/Inf refused."""
        return self._finite(self._vec_file.read_rows(idx), VECTORS_FILE)

    def read_embeddings(self, idx) -> np.ndarray:
        """Embeddings of rows ``idx`` (float32); NaN/Inf refused."""
        return self._finite(self._emb_file.read_rows(idx), EMBEDDINGS_FILE)

    def _finite(self, rows: np.ndarray, name: str) -> np.ndarray:
        if not np.isfinite(rows).all():
            raise LibraryError(f"pack {self.path}: {name} holds NaN/Inf values; re-pack the library (`lorasynth library pack`)")
        return rows

    def standardize(self, raw: np.ndarray) -> np.ndarray:
        return ((np.asarray(raw, dtype=np.float32) - self.mean) / self.scale).astype(np.float32)

    def destandardize(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float32) * self.scale + self.mean).astype(np.float32)

    def index_of(self, entry_id: str) -> int:
        try:
            return self.ids.index(entry_id)
        except ValueError:
            raise LibraryError(f"no entry {entry_id!r} in pack {self.path}") from None


def _open_rows(path: Path, name: str, shape: tuple[int, int]) -> _RowFile:
    """Open the pack's row file ``name`` and check it holds ``shape`` (rows, columns)."""
    try:
        rows = _RowFile.open(path / name)
    except (OSError, ValueError, EOFError, SyntaxError, tokenize.TokenError) as e:  # a garbled .npy header
        raise LibraryError(f"pack {path}: {name} is unreadable ({e})") from None
    if (rows.n_rows, rows.n_cols) != shape:
        raise LibraryError(f"pack {path}: {name} has shape {(rows.n_rows, rows.n_cols)}, expected {shape}")
    return rows


def open_pack(path: str | Path) -> Pack:
    """Open and validate a pack directory; raise :class:`LibraryError` saying what is wrong."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise LibraryError(f"no pack at {path} (expected a directory made by `lorasynth pack`)")
    for name in (META_FILE, VECTORS_FILE, STATS_FILE):
        if not os.path.lexists(path / name):
            raise LibraryError(f"pack {path} is incomplete: {name} is missing")
    meta = read_json(path / META_FILE, "pack description", dict, error=LibraryError)
    if meta.get("format") != "lorasynth-pack":
        raise LibraryError(f"pack {path}: {META_FILE} is not a lorasynth pack description")
    if meta.get("version") != PACK_VERSION:
        raise LibraryError(f"pack {path}: unsupported pack version {meta.get('version')!r} (expected {PACK_VERSION})")
    try:
        layout = Layout.from_dict(meta["layout"])
        n, dim, embed_dim, ids = int(meta["n"]), int(meta["dim"]), int(meta["embed_dim"]), list(meta["ids"])
    except (KeyError, TypeError, ValueError, LayoutError) as e:
        raise LibraryError(f"pack {path}: {META_FILE} is malformed ({e})") from None
    if layout.signature != meta.get("layout_signature"):
        raise LibraryError(f"pack {path}: layout signature mismatch (file says {meta.get('layout_signature')}, layout hashes to {layout.signature})")
    if dim != layout.size or len(ids) != n:
        raise LibraryError(f"pack {path}: inconsistent {META_FILE} (dim {dim} vs layout {layout.size}, {len(ids)} ids for n={n})")
    vec = _open_rows(path, VECTORS_FILE, (n, dim))
    if embed_dim:
        if not os.path.lexists(path / EMBEDDINGS_FILE):
            raise LibraryError(f"pack {path} is incomplete: {EMBEDDINGS_FILE} is missing")
        emb = _open_rows(path, EMBEDDINGS_FILE, (n, embed_dim))
    else:
        emb = _RowFile(path / EMBEDDINGS_FILE, n, 0, 0)
    raw = read_input_bytes(path / STATS_FILE, "pack statistics file", MAX_STATS_BYTES, LibraryError, mutable=True)
    stats = {k: v.numpy() for k, v in safetensors_from_bytes(raw, path / STATS_FILE, LibraryError)[0].items()}
    for key in ("mean", "std"):
        if key not in stats or stats[key].shape != (dim,):
            raise LibraryError(f"pack {path}: {STATS_FILE} lacks a ({dim},) {key!r} tensor")
    mean, std = stats["mean"].astype(np.float32), stats["std"].astype(np.float32)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise LibraryError(f"pack {path}: {STATS_FILE} holds NaN/Inf")
    return Pack(path, layout, ids, str(meta.get("embedder", "")), mean, std, meta, vec, emb)


# --------------------------------------------------------------------------- dataset


class PackDataset(Dataset):
    """Rows of a pack as training samples, read from disk on demand (bounded RAM).

    Each item is a dict: ``"x"`` the standardised vector ``(raw - mean) / scale`` (float32
    ``D``), ``"embedding"`` (float32 ``E``; empty when the pack has none) and ``"index"``
    (the pack row). ``idx`` restricts the dataset to some rows (e.g. a train split).
    Implements ``__getitems__`` so a DataLoader fetches a whole batch with a few reads.
    """

    def __init__(self, pack: Pack, idx: Sequence[int] | np.ndarray | None = None):
        self.pack = pack
        self.idx = np.arange(pack.n, dtype=np.int64) if idx is None else np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(self.idx) and (self.idx.min() < 0 or self.idx.max() >= pack.n):
            raise IndexError(f"dataset rows out of range 0..{pack.n - 1}")
        self.mean = pack.mean.copy()
        self.scale = pack.scale.copy()

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, items: Sequence[int]) -> list[dict]:
        rows = self.idx[np.asarray(items, dtype=np.int64)]
        raw = self.pack.read_rows(rows)  # a fresh buffer: standardise in place (no extra batch copies)
        np.subtract(raw, self.mean, out=raw)
        np.divide(raw, self.scale, out=raw)
        x = torch.from_numpy(raw)
        emb = torch.from_numpy(self.pack.read_embeddings(rows))
        return [{"x": x[j], "embedding": emb[j], "index": int(rows[j])} for j in range(len(rows))]
