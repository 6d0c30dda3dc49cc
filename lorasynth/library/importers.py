"""Bulk imports into a :class:`~lorasynth.library.store.Library`: a folder of LoRA files, or w2w rows.

Folder import (:func:`import_folder`) takes every ``NAME.safetensors`` (kohya, diffusers
or peft keys, auto-detected) directly in the folder, with optional sidecars:

* ``NAME.npy``  - the face embedding for the library's embedder (1-D float; read with
  ``allow_pickle=False``). Takes precedence over photos.
* ``NAME.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` and/or a folder ``NAME/`` of photos -
  embedded on import (largest face of each), averaged and re-normalized.
* ``NAME.json`` - a JSON object of attributes.

A sub-folder ``NAME/`` holding ``adapter_model.safetensors`` (+ ``adapter_config.json``,
peft) or ``pytorch_lora_weights.safetensors`` (diffusers) is imported as LoRA ``NAME``.
A bad file is reported and skipped; the rest of the import goes on (the CLI then exits 1 with
a summary). A file whose entry is already stored but whose blob file is missing or corrupt
repairs that blob.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from lorasynth.faces.embeddings import read_embedding_npy
from lorasynth.errors import LayoutError, LibraryError, LorasynthError
from lorasynth.formats import load_lora
from lorasynth.core.safe_io import read_json
from lorasynth.formats.w2w import W2WDataset
from lorasynth.core.layout import Layout
from lorasynth.library.store import KNOWN_EMBEDDER_DIMS, AddResult, Library, NewEntry, clean_embedding

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LORA_SUFFIX = ".safetensors"
ADAPTER_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
KNOWN_DIMS = KNOWN_EMBEDDER_DIMS  # checked before any model is loaded


@dataclass
class ImportReport:
    """What an import did: entries added, duplicates skipped, per-file errors, notes."""

    added: list[AddResult] = field(default_factory=list)
    duplicates: list[tuple[str, AddResult]] = field(default_factory=list)  # (source, existing entry)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (source, message without the source)
    notes: list[str] = field(default_factory=list)
    repaired: list[tuple[str, AddResult]] = field(default_factory=list)  # duplicates whose damaged blob was rewritten

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        repaired = f", repaired {len(self.repaired)}" if self.repaired else ""
        return f"added {len(self.added)}, duplicates {len(self.duplicates)}{repaired}, errors {len(self.errors)}"

    def error(self, source: str, exc: BaseException) -> None:
        """Record a per-file error; the message loses a leading ``source:`` (the report prints it once)."""
        msg = str(exc)
        for prefix in (f"{source}: ", f"{source} "):
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
                break
        if not isinstance(exc, LorasynthError):
            msg = f"unreadable ({type(exc).__name__}: {msg})"
        self.errors.append((source, msg))

    def to_dict(self) -> dict:
        return {
            "added": [{"id": r.id, "name": r.name} for r in self.added],
            "duplicates": [{"source": s, "id": r.id, "name": r.name} for s, r in self.duplicates],
            "errors": [{"source": s, "error": m} for s, m in self.errors],
            "repaired": [{"source": s, "id": r.id, "name": r.name} for s, r in self.repaired],
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class FolderItem:
    """One LoRA file of an import folder and the sidecars found for it."""

    name: str
    lora_path: Path
    embedding_path: Path | None = None
    photos: tuple[Path, ...] = ()
    attributes_path: Path | None = None


def progress_bar(iterable: Iterable, enabled: bool, total: int | None = None, desc: str = "", unit: str = "lora"):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


def _photos_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES and not p.name.startswith("."))


def scan_folder(folder: str | os.PathLike) -> list[FolderItem]:
    """The LoRAs in ``folder`` (sorted by name) with their sidecars.

    A LoRA is ``NAME.safetensors`` directly in the folder, or a sub-folder ``NAME/``
    holding a saved adapter (``adapter_model.safetensors`` + ``adapter_config.json`` from
    peft, or diffusers' ``pytorch_lora_weights.safetensors``); photos inside such an
    adapter folder count as its face photos, like those of a plain ``NAME/`` folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LibraryError(f"{folder} is not a folder")
    candidates: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix.lower() == LORA_SUFFIX:
            candidates[path.name[: -len(LORA_SUFFIX)]] = path
        elif path.is_dir():
            for inner in ADAPTER_FILES:
                if (path / inner).is_file() and path.name not in candidates:
                    candidates[path.name] = path / inner
                    break
    items = []
    for stem in sorted(candidates):
        path = candidates[stem]
        photos = [folder / f"{stem}{ext}" for ext in PHOTO_SUFFIXES if (folder / f"{stem}{ext}").is_file()]
        photos += [folder / f"{stem}{ext.upper()}" for ext in PHOTO_SUFFIXES if (folder / f"{stem}{ext.upper()}").is_file()]
        if (folder / stem).is_dir():
            photos += _photos_in(folder / stem)
        npy, js = folder / f"{stem}.npy", folder / f"{stem}.json"
        items.append(
            FolderItem(stem, path, npy if npy.is_file() else None, tuple(dict.fromkeys(photos)), js if js.is_file() else None)
        )
    return items


def read_embedding_file(path: str | os.PathLike, dim: int | None = None) -> np.ndarray:
    """A 1-D float embedding from a ``.npy`` file (never unpickled), unit-normalized."""
    return read_embedding_npy(path, dim=dim, error=LibraryError)


def read_attributes_file(path: str | os.PathLike) -> dict:
    """A JSON object of attributes (strict JSON: UTF-8, bounded nesting, no duplicate keys)."""
    return read_json(path, "attributes", dict, max_bytes=1 << 20, error=LibraryError)


def embed_photos(embedder, photos: Iterable[str | os.PathLike]) -> np.ndarray:
    """Mean of the (largest-face) embeddings of several photos, re-normalized to unit length."""
    vecs = [embedder.embed(str(p)).embedding for p in photos]
    if not vecs:
        raise LibraryError("no photos to embed")
    return clean_embedding(np.mean(np.stack(vecs), axis=0), "mean photo embedding")


#: what one bad input file may raise: the project's errors, plus the malformed-input exceptions of
#: the libraries under it (I/O, value and struct errors from decoders). Anything else is a bug: it
#: propagates with its traceback.
_PER_FILE_ERRORS = (LorasynthError, OSError, ValueError, struct.error, RecursionError)


class _LazyEmbedder:
    """Loads the face model only when a photo actually needs embedding."""

    def __init__(self, embedder, model_root: str | None):
        self._spec, self._model_root, self._obj = embedder, model_root, None

    @property
    def name(self) -> str | None:
        return self._spec if isinstance(self._spec, str) or self._spec is None else self._spec.name

    def get(self):
        if self._obj is None:
            if self._spec is None:
                raise LibraryError("photos need a face embedder, but the library has none (pass one)")
            if isinstance(self._spec, str):
                from lorasynth.faces import get_embedder

                self._obj = get_embedder(self._spec, self._model_root)
            else:
                self._obj = self._spec
        return self._obj


def import_folder(
    lib: Library,
    folder: str | os.PathLike,
    embedder=None,
    model_root: str | None = None,
    progress: bool = True,
) -> ImportReport:
    """Add every LoRA file of ``folder`` (with sidecars) to ``lib``; errors are per file.

    ``embedder`` is a face embedder object or name; default the library's embedder.
    Embeddings are stored under that embedder's name.
    """
    items = scan_folder(folder)
    emb = _LazyEmbedder(embedder if embedder is not None else lib.embedder, model_root)
    report = ImportReport()
    if not items:
        report.notes.append(f"no *{LORA_SUFFIX} files in {folder}")
    for item in progress_bar(items, progress, len(items), "import"):
        source = str(item.lora_path)
        try:
            lora = load_lora(item.lora_path)
            attrs = read_attributes_file(item.attributes_path) if item.attributes_path else {}
            embeddings = {}
            if item.embedding_path is not None or item.photos:
                if emb.name is None:
                    raise LibraryError("has an embedding/photo sidecar but the library has no embedder (pass one)")
                if item.embedding_path is not None:
                    embeddings[emb.name] = read_embedding_file(item.embedding_path, KNOWN_DIMS.get(emb.name))
                    if item.photos:
                        report.notes.append(f"{item.name}: used {item.embedding_path.name}, ignored {len(item.photos)} photo(s)")
                else:
                    embeddings[emb.name] = embed_photos(emb.get(), item.photos)
            result = lib.add(lora, item.name, source=source, attributes=attrs, embeddings=embeddings)
        except _PER_FILE_ERRORS as e:
            report.error(source, e)
            continue
        if result.repaired:
            report.repaired.append((source, result))
        (report.duplicates.append((source, result)) if result.duplicate else report.added.append(result))
    return report


def import_w2w(
    lib: Library,
    root: str | os.PathLike,
    start: int = 0,
    stop: int | None = None,
    trust_pickle: bool = False,
    identity_order: str = "file",
    batch_size: int = 32,
    progress: bool = True,
    dataset: W2WDataset | None = None,
) -> ImportReport:
    """Stream rows ``start:stop`` of a w2w dataset into ``lib`` (which must use the w2w layout).

    Entries are named ``w2w-NNNNN`` (row number) with attribute ``w2w_row``; with
    ``trust_pickle=True`` and an ``identity_df.pt`` present, its CelebA attributes are
    added too (the file is a pickle: see :func:`lorasynth.formats.w2w.load_identity_table`).
    Rows go in batches of ``batch_size`` per transaction; memory stays one batch of rows.
    """
    w2w = Layout.w2w()
    if lib.layout.signature != w2w.signature:
        raise LayoutError(
            f"library layout {lib.layout.signature} is not the w2w layout {w2w.signature}; "
            "create the library with `--layout w2w`"
        )
    ds = dataset or W2WDataset(root, trust_pickle=trust_pickle, identity_order=identity_order)
    n = len(ds)
    start = max(0, int(start))
    stop = n if stop is None else min(int(stop), n)
    report = ImportReport()
    attrs_table = None
    if ds.identity_path is not None:
        if trust_pickle:
            attrs_table = ds.identity_attributes()
        else:
            report.notes.append(
                f"{ds.identity_path.name} not read (a pickle; pass --trust-pickle to import CelebA attributes)"
            )
    rows = range(start, stop)

    def entry(i: int) -> NewEntry:
        attrs = {"w2w_row": i}
        if attrs_table is not None and i < len(attrs_table):
            attrs.update({f"celeba_{k}" if k != "file" else "w2w_file": v for k, v in attrs_table[i].items()})
        return NewEntry(ds.row_to_lora(i), f"w2w-{i:05d}", f"w2w:{ds.weights_path}#{i}", attrs)

    def flush(batch: list[tuple[int, NewEntry]]) -> None:
        try:
            results = lib.add_many([e for _, e in batch])
        except LorasynthError:  # find the bad row(s) one by one
            for i, e in batch:
                try:
                    r = lib.add(e.lora, e.name, e.source, e.attributes)
                except LorasynthError as err:
                    report.errors.append((f"row {i}", str(err)))
                    continue
                (report.duplicates.append((f"row {i}", r)) if r.duplicate else report.added.append(r))
            return
        for (i, _), r in zip(batch, results):
            (report.duplicates.append((f"row {i}", r)) if r.duplicate else report.added.append(r))

    batch: list[tuple[int, NewEntry]] = []
    for i in progress_bar(rows, progress, len(rows), "import w2w", "row"):
        try:
            batch.append((i, entry(i)))
        except LorasynthError as err:
            report.errors.append((f"row {i}", str(err)))
        if len(batch) >= batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    return report
