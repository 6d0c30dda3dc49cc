"""The library's value types: settings, manifest entries, results and reports, and new-entry checks.

Plain data, shared by :class:`~lorasynth.library.store.Library` and the modules that feed it
(:mod:`lorasynth.library.importers`, :mod:`lorasynth.library.merge`). :func:`prepare_entry` is
everything that can be checked about a :class:`NewEntry` before the manifest is touched.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from lorasynth.faces.embeddings import check_embedding
from lorasynth.errors import FormatError, LayoutError, LibraryError
from lorasynth.core.layout import Layout
from lorasynth.core.lora import LoRA
from lorasynth.library.blobs import encode_blob

KNOWN_EMBEDDER_DIMS = {"dlib": 128, "arcface": 512}  # checked without loading any face model


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


# --------------------------------------------------------------------------- checks


def clean_embedding(vec, what: str = "embedding") -> np.ndarray:
    """A finite, non-zero 1-D vector as float32 with unit L2 norm (cosine = dot product); see :mod:`lorasynth.faces.embeddings`."""
    return check_embedding(vec, what, error=LibraryError)


def prepare_entry(item: NewEntry, layout: Layout) -> tuple[bytes, str, dict[str, np.ndarray]]:
    """``(blob bytes, their sha256, clean embeddings)`` of a new entry, or why it cannot be stored.

    Checks the name (not empty, not all digits), that the LoRA fits ``layout`` (LayoutError),
    that attributes are a JSON-serializable dict, the embeddings (finite, non-zero, the known
    dimension of their embedder) and that every weight is finite (LibraryError otherwise).
    """
    name = str(item.name).strip()
    if not name:
        raise LibraryError("entry name must not be empty")
    if name.isdigit():
        raise LibraryError(f"entry name {name!r} must not be all digits (it would read as an id)")
    why = layout.mismatch(item.lora)
    if why is not None:
        raise LayoutError(f"{name}: LoRA does not fit the library layout {layout.signature}: {why}")
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
